//! The PostgreSQL back end: one connection per relay, which also `LISTEN`s for the changes
//! other relays announce. It is made (and remade after the database went away) by
//! [`Postgres::connect`], which [`super::watch`] calls; queries between two connections fail
//! with [`StoreError::Down`].

use futures_util::StreamExt;
use tokio::sync::{mpsc, Mutex};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{AsyncMessage, Client, NoTls};

use super::{backfill_keys, pending, Done, Op, Result, StoreError, Val, KEYS_VERSION};

/// The channel changes are announced on.
pub(super) const CHANNEL: &str = "turnpike_store";

/// Serialises the relays' migrations.
const MIGRATION_LOCK: i64 = 0x7475_726e_7069_6b65; // "turnpike"

pub(super) struct Postgres {
    url: String,
    /// One connection, used by one call at a time: a transaction on it is never shared with
    /// another caller's statements.
    client: Mutex<Option<Client>>,
}

fn db(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// tokio-postgres's error text, with its cause (the server's message or the socket error).
fn detail(e: &tokio_postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(s) => format!("{e}: {s}"),
        None => e.to_string(),
    }
}

impl Postgres {
    pub(super) fn new(url: &str) -> Postgres {
        Postgres {
            url: url.to_owned(),
            client: Mutex::new(None),
        }
    }

    /// Connects, migrates, listens; returns the receiver of change notices (None when the
    /// connection ends).
    pub(super) async fn connect(&self) -> Result<Option<mpsc::Receiver<()>>> {
        *self.client.lock().await = None;
        let (client, mut connection) = tokio_postgres::connect(&self.url, NoTls)
            .await
            .map_err(|e| StoreError::Down(detail(&e)))?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(m) = messages.next().await {
                match m {
                    Ok(AsyncMessage::Notification(_)) => {
                        let _ = tx.try_send(());
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "store connection ended");
                        break;
                    }
                }
            }
        });
        let down = |e: tokio_postgres::Error| StoreError::Down(detail(&e));
        client
            .batch_execute(&format!(
                "SELECT pg_advisory_lock({MIGRATION_LOCK});
                 CREATE TABLE IF NOT EXISTS turnpike_schema (version BIGINT NOT NULL);
                 INSERT INTO turnpike_schema (version)
                   SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM turnpike_schema);"
            ))
            .await
            .map_err(down)?;
        let version: i64 = client
            .query_one("SELECT version FROM turnpike_schema", &[])
            .await
            .map_err(down)?
            .get(0);
        let mut client = client;
        let migrated = async {
            for (v, sql) in pending(version)? {
                let migration =
                    |e: tokio_postgres::Error| db(format!("migration {v}: {}", detail(&e)));
                let tx = client.transaction().await.map_err(migration)?;
                tx.batch_execute(&sql).await.map_err(migration)?;
                if v == KEYS_VERSION {
                    let tenants: Vec<Vec<Val>> = tx
                        .query("SELECT name, doc FROM tenants", &[])
                        .await
                        .map_err(migration)?
                        .iter()
                        .map(row)
                        .collect();
                    for (sql, params) in backfill_keys(&tenants) {
                        tx.execute(sql.as_str(), &to_sql(&params))
                            .await
                            .map_err(migration)?;
                    }
                }
                tx.commit().await.map_err(migration)?;
                tracing::info!(version = v, "store schema migrated");
            }
            Ok::<_, StoreError>(())
        }
        .await;
        let unlocked = client
            .batch_execute(&format!(
                "SELECT pg_advisory_unlock({MIGRATION_LOCK}); LISTEN {CHANNEL};"
            ))
            .await
            .map_err(down);
        migrated?;
        unlocked?;
        *self.client.lock().await = Some(client);
        Ok(Some(rx))
    }

    /// The connection, for one call.
    async fn client(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Client>>> {
        let c = self.client.lock().await;
        match c.as_ref() {
            Some(client) if !client.is_closed() => Ok(c),
            _ => Err(StoreError::Down("not connected".into())),
        }
    }

    pub(super) async fn exec(&self, sql: &str, params: Vec<Val>) -> Result<u64> {
        let guard = self.client().await?;
        let c = guard
            .as_ref()
            .ok_or_else(|| StoreError::Down("not connected".into()))?;
        let refs = to_sql(&params);
        c.execute(sql, &refs).await.map_err(|e| fail(c, &e))
    }

    pub(super) async fn query(&self, sql: &str, params: Vec<Val>) -> Result<Vec<Vec<Val>>> {
        let guard = self.client().await?;
        let c = guard
            .as_ref()
            .ok_or_else(|| StoreError::Down("not connected".into()))?;
        let refs = to_sql(&params);
        let rows = c.query(sql, &refs).await.map_err(|e| fail(c, &e))?;
        Ok(rows.iter().map(row).collect())
    }

    /// Runs `ops` in one transaction (see [`Op`]); `reads` are queries it runs after them,
    /// in the same transaction.
    pub(super) async fn transact(&self, ops: Vec<Op>) -> Result<Done> {
        let mut guard = self.client().await?;
        let c = guard
            .as_mut()
            .ok_or_else(|| StoreError::Down("not connected".into()))?;
        let closed = |c: &Client, e: &tokio_postgres::Error| fail(c, e);
        let tx = match c.transaction().await {
            Ok(tx) => tx,
            Err(e) => return Err(StoreError::Down(detail(&e))),
        };
        let mut changed = Vec::with_capacity(ops.len());
        for op in &ops {
            let refs = to_sql(&op.params);
            let n = match tx.execute(op.sql.as_str(), &refs).await {
                Ok(n) => n,
                Err(e) => {
                    let err = refusal(&e).unwrap_or_else(|| StoreError::Db(detail(&e)));
                    let _ = tx.rollback().await;
                    return Err(match closed(c, &e) {
                        StoreError::Down(d) => StoreError::Down(d),
                        _ => err,
                    });
                }
            };
            if op.guard && n == 0 {
                let _ = tx.rollback().await;
                return Ok(Done::Skipped);
            }
            changed.push(n);
        }
        match tx.commit().await {
            Ok(()) => Ok(Done::Committed(changed)),
            Err(e) => Err(StoreError::Down(detail(&e))),
        }
    }
}

/// One row as values.
fn row(r: &tokio_postgres::Row) -> Vec<Val> {
    r.columns()
        .iter()
        .enumerate()
        .map(|(i, col)| match *col.type_() {
            Type::INT8 | Type::INT4 => r.get::<_, Option<i64>>(i).map_or(Val::Null, Val::Int),
            _ => r.get::<_, Option<String>>(i).map_or(Val::Null, Val::Text),
        })
        .collect()
}

/// A constraint's refusal (a clash), where that is what failed.
fn refusal(e: &tokio_postgres::Error) -> Option<StoreError> {
    let code = e.code()?;
    (*code == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
        || *code == tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE)
        .then(|| StoreError::Conflict(detail(e)))
}

/// Down when the connection is gone, a conflict for a constraint's refusal, else the
/// database's refusal.
fn fail(c: &Client, e: &tokio_postgres::Error) -> StoreError {
    if c.is_closed() || e.is_closed() {
        StoreError::Down(detail(e))
    } else {
        refusal(e).unwrap_or_else(|| db(detail(e)))
    }
}

static NULL: Option<String> = None;

fn to_sql(params: &[Val]) -> Vec<&(dyn ToSql + Sync)> {
    params
        .iter()
        .map(|p| match p {
            Val::Text(s) => s as &(dyn ToSql + Sync),
            Val::Int(i) => i as &(dyn ToSql + Sync),
            Val::Null => &NULL as &(dyn ToSql + Sync),
        })
        .collect()
}

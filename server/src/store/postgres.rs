//! The PostgreSQL back end: one connection per relay, which also `LISTEN`s for the changes
//! other relays announce. It is made (and remade after the database went away) by
//! [`Postgres::connect`], which [`super::watch`] calls; queries between two connections fail
//! with [`StoreError::Down`].

use std::sync::Arc;

use futures_util::StreamExt;
use tokio::sync::{mpsc, RwLock};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{AsyncMessage, Client, NoTls};

use super::{pending, Result, StoreError, Val};

/// The channel changes are announced on.
pub(super) const CHANNEL: &str = "turnpike_store";

/// Serialises the relays' migrations.
const MIGRATION_LOCK: i64 = 0x7475_726e_7069_6b65; // "turnpike"

pub(super) struct Postgres {
    url: String,
    client: RwLock<Option<Arc<Client>>>,
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
            client: RwLock::new(None),
        }
    }

    /// Connects, migrates, listens; returns the receiver of change notices (None when the
    /// connection ends).
    pub(super) async fn connect(&self) -> Result<Option<mpsc::Receiver<()>>> {
        *self.client.write().await = None;
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
        let migrated = async {
            for (v, sql) in pending(version)? {
                client
                    .batch_execute(&format!("BEGIN; {sql} COMMIT;"))
                    .await
                    .map_err(|e| db(format!("migration {v}: {}", detail(&e))))?;
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
        *self.client.write().await = Some(Arc::new(client));
        Ok(Some(rx))
    }

    async fn client(&self) -> Result<Arc<Client>> {
        self.client
            .read()
            .await
            .clone()
            .filter(|c| !c.is_closed())
            .ok_or_else(|| StoreError::Down("not connected".into()))
    }

    pub(super) async fn exec(&self, sql: &str, params: Vec<Val>) -> Result<u64> {
        let c = self.client().await?;
        let refs = to_sql(&params);
        c.execute(sql, &refs).await.map_err(|e| fail(&c, &e))
    }

    pub(super) async fn query(&self, sql: &str, params: Vec<Val>) -> Result<Vec<Vec<Val>>> {
        let c = self.client().await?;
        let refs = to_sql(&params);
        let rows = c.query(sql, &refs).await.map_err(|e| fail(&c, &e))?;
        Ok(rows
            .iter()
            .map(|r| {
                r.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, col)| match *col.type_() {
                        Type::INT8 | Type::INT4 => {
                            r.get::<_, Option<i64>>(i).map_or(Val::Null, Val::Int)
                        }
                        _ => r.get::<_, Option<String>>(i).map_or(Val::Null, Val::Text),
                    })
                    .collect()
            })
            .collect())
    }
}

/// Down when the connection is gone, else the database's refusal.
fn fail(c: &Client, e: &tokio_postgres::Error) -> StoreError {
    if c.is_closed() || e.is_closed() {
        StoreError::Down(detail(e))
    } else {
        db(detail(e))
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

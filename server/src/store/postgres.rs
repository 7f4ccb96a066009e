//! The PostgreSQL back end: one connection per relay, which also `LISTEN`s for the changes
//! other relays announce. It is made (and remade after the database went away) by
//! [`Postgres::connect`], which [`super::watch`] calls; queries between two connections fail
//! with [`StoreError::Down`].

use std::sync::Arc;

use futures_util::StreamExt;
use tokio::sync::{mpsc, Mutex};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{backfill_keys, pending, Done, Op, Result, StoreError, Val, KEYS_VERSION};

/// The channel changes are announced on.
pub(super) const CHANNEL: &str = "turnpike_store";

/// Serialises the relays' migrations.
const MIGRATION_LOCK: i64 = 0x7475_726e_7069_6b65; // "turnpike"

pub(super) struct Postgres {
    /// The connection string as tokio-postgres takes it (`sslmode` at most `require`, no
    /// `sslrootcert`), and how TLS is checked.
    url: String,
    tls: Tls,
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
    /// A store at `url`; an error names what is wrong with its TLS settings.
    pub(super) fn new(url: &str) -> Result<Postgres> {
        let (url, tls) = Tls::of(url)?;
        Ok(Postgres {
            url,
            tls,
            client: Mutex::new(None),
        })
    }

    /// Connects, migrates, listens; returns the receiver of change notices (None when the
    /// connection ends).
    pub(super) async fn connect(&self) -> Result<Option<mpsc::Receiver<()>>> {
        *self.client.lock().await = None;
        let connected = match self.tls.connector()? {
            None => tokio_postgres::connect(&self.url, NoTls)
                .await
                .map(|(c, conn)| (c, Connection::Plain(conn))),
            Some(tls) => tokio_postgres::connect(&self.url, tls)
                .await
                .map(|(c, conn)| (c, Connection::Tls(conn))),
        };
        let (client, mut connection) = connected.map_err(|e| StoreError::Down(detail(&e)))?;
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

/// The connection's task's half, with TLS or without (one per relay: the sizes do not matter).
#[allow(clippy::large_enum_variant)]
enum Connection {
    Plain(tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>),
    Tls(
        tokio_postgres::Connection<
                tokio_postgres::Socket,
                <MakeRustlsConnect as tokio_postgres::tls::MakeTlsConnect<
                    tokio_postgres::Socket,
                >>::Stream,
            >,
    ),
}

impl Connection {
    fn poll_message(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<std::result::Result<AsyncMessage, tokio_postgres::Error>>> {
        match self {
            Connection::Plain(c) => c.poll_message(cx),
            Connection::Tls(c) => c.poll_message(cx),
        }
    }
}

/// How a connection is encrypted and checked, as libpq's `sslmode` and `sslrootcert` say:
/// `disable` (plain), `prefer` (TLS when the server offers it, unchecked: libpq's default),
/// `require` (TLS, unchecked, or checked against `sslrootcert` when one is named, as libpq
/// does), `verify-ca` (the chain against `sslrootcert`, or the system's roots) and
/// `verify-full` (the chain and the host name). A Unix socket connection is never encrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Tls {
    mode: SslMode,
    root: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// The roots a verifying mode uses without `sslrootcert`.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

impl Tls {
    /// Takes `sslmode` and `sslrootcert` out of a connection string (URL or libpq's
    /// keywords) for tokio-postgres, which knows neither `verify-*` nor `sslrootcert`.
    fn of(url: &str) -> Result<(String, Tls)> {
        let mut mode = None;
        let mut root = None;
        let mut take = |key: &str, value: &str| -> Result<bool> {
            match key {
                "sslmode" => {
                    mode = Some(match value {
                        "disable" => SslMode::Disable,
                        "allow" | "prefer" => SslMode::Prefer,
                        "require" => SslMode::Require,
                        "verify-ca" => SslMode::VerifyCa,
                        "verify-full" => SslMode::VerifyFull,
                        other => {
                            return Err(StoreError::Db(format!(
                            "sslmode={other}: disable, prefer, require, verify-ca or verify-full"
                        )))
                        }
                    });
                    Ok(true)
                }
                "sslrootcert" => {
                    root = Some(std::path::PathBuf::from(value));
                    Ok(true)
                }
                _ => Ok(false),
            }
        };
        let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            match url.split_once('?') {
                None => url.to_owned(),
                Some((base, query)) => {
                    let mut kept = Vec::new();
                    for kv in query.split('&') {
                        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                        let v = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
                        if !take(k, &v)? {
                            kept.push(kv);
                        }
                    }
                    if kept.is_empty() {
                        base.to_owned()
                    } else {
                        format!("{base}?{}", kept.join("&"))
                    }
                }
            }
        } else {
            let mut kept = Vec::new();
            for kv in keywords(url) {
                let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
                let v = v.trim_matches('\'');
                if !take(k.trim(), v)? {
                    kept.push(kv.clone());
                }
            }
            kept.join(" ")
        };
        let mode = mode.unwrap_or(SslMode::Prefer);
        let rest = match mode {
            SslMode::Disable => format!("{rest}{}sslmode=disable", sep(url, &rest)),
            SslMode::Prefer => format!("{rest}{}sslmode=prefer", sep(url, &rest)),
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                format!("{rest}{}sslmode=require", sep(url, &rest))
            }
        };
        Ok((rest, Tls { mode, root }))
    }

    /// The connector for this mode (None: plain).
    fn connector(&self) -> Result<Option<MakeRustlsConnect>> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| StoreError::Db(format!("TLS: {e}")))?;
        let verify = match (self.mode, &self.root) {
            (SslMode::Disable, _) => return Ok(None),
            // libpq checks a `require` connection when a root is named.
            (SslMode::Prefer, _) | (SslMode::Require, None) => None,
            (SslMode::Require, Some(_)) | (SslMode::VerifyCa, _) => Some(false),
            (SslMode::VerifyFull, _) => Some(true),
        };
        let config = match verify {
            None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unchecked(provider)))
                .with_no_client_auth(),
            Some(names) => {
                let roots = Arc::new(self.roots()?);
                let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    roots,
                    Arc::clone(&provider),
                )
                .build()
                .map_err(|e| StoreError::Db(format!("TLS: {e}")))?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(Checked { webpki, names }))
                    .with_no_client_auth()
            }
        };
        Ok(Some(MakeRustlsConnect::new(config)))
    }

    fn roots(&self) -> Result<rustls::RootCertStore> {
        use rustls::pki_types::pem::PemObject;
        let file = self
            .root
            .clone()
            .unwrap_or_else(|| std::path::PathBuf::from(SYSTEM_ROOTS));
        let bad = |e: &dyn std::fmt::Display| {
            StoreError::Db(format!("sslrootcert {}: {e}", file.display()))
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(&file).map_err(|e| bad(&e))? {
            roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
        }
        if roots.is_empty() {
            return Err(bad(&"no certificate in the file"));
        }
        Ok(roots)
    }
}

/// How a kept keyword joins the connection string.
fn sep(url: &str, rest: &str) -> &'static str {
    match (
        url.starts_with("postgres"),
        rest.contains('?'),
        rest.is_empty(),
    ) {
        (true, true, _) => "&",
        (true, false, _) => "?",
        (false, _, true) => "",
        (false, _, false) => " ",
    }
}

/// libpq's `key=value` words, a quoted value (`'with spaces'`) kept whole.
fn keywords(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                cur.push(c);
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '\'' => {
                quoted = !quoted;
                cur.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// `prefer` and `require` without a root: encrypted, the certificate unchecked (libpq's
/// behaviour; `verify-full` is what checks the server).
#[derive(Debug)]
struct Unchecked(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for Unchecked {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca` (`names` false: the chain only) and `verify-full` (the host name too).
#[derive(Debug)]
struct Checked {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    names: bool,
}

impl rustls::client::danger::ServerCertVerifier for Checked {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) if !self.names => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_sslrootcert_are_taken_out_of_both_forms() {
        let (rest, tls) = Tls::of(
            "postgres://u@db.example/fleet?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=5",
        )
        .expect("url");
        assert_eq!(
            rest,
            "postgres://u@db.example/fleet?connect_timeout=5&sslmode=require"
        );
        assert_eq!(
            tls,
            Tls {
                mode: SslMode::VerifyFull,
                root: Some("/etc/ca.pem".into())
            }
        );
        let (rest, tls) =
            Tls::of("host=db.example sslmode=verify-ca sslrootcert='/etc/my ca.pem' dbname=f")
                .expect("keywords");
        assert_eq!(rest, "host=db.example dbname=f sslmode=require");
        assert_eq!(tls.root, Some("/etc/my ca.pem".into()));
        assert_eq!(
            Tls::of("host=/run/pg").expect("socket").1.mode,
            SslMode::Prefer
        );
        let e = Tls::of("host=db sslmode=verify")
            .map(|_| ())
            .expect_err("bad");
        assert!(e.to_string().contains("sslmode=verify"), "{e}");
    }
}

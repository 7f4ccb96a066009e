//! `turnpike admin ...`: the admin API from a shell. Prints the relay's JSON answer; exits
//! 1 with the relay's error when it refuses.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::json;

/// The admin API of a running relay.
#[derive(Parser)]
#[command(
    name = "turnpike admin",
    about = "Tenants, users, live allocations and usage of a running relay"
)]
pub struct AdminCli {
    /// The relay's metrics listener or an HTTPS listener.
    #[arg(
        long,
        env = "TURNPIKE_ADMIN_URL",
        default_value = "http://127.0.0.1:9641"
    )]
    pub url: String,
    /// An admin key (one of `[admin] keys`, by its SHA-256).
    #[arg(long, env = "TURNPIKE_ADMIN_KEY", hide_env_values = true)]
    pub key: String,
    /// CA certificate (PEM) to check an https:// relay with, instead of the system's.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// List every tenant (configuration file and store); secrets are only counted.
    Tenants,
    /// Create or replace a tenant in the store from a `[[tenant]]` table as JSON (file or -).
    PutTenant { name: String, file: PathBuf },
    /// Create a tenant with a realm and shared secrets (and optional API keys' hashes).
    AddTenant {
        name: String,
        #[arg(long)]
        realm: String,
        #[arg(long = "secret")]
        secrets: Vec<String>,
        #[arg(long = "hostname")]
        hostnames: Vec<String>,
        #[arg(long = "api-key-hash")]
        api_keys: Vec<String>,
    },
    /// Delete a store tenant with its users and revocations (one transaction).
    DeleteTenant { name: String },
    /// Add or change a static user of a store tenant.
    PutUser {
        tenant: String,
        user: String,
        #[arg(long, env = "TURNPIKE_USER_PASSWORD", hide_env_values = true)]
        password: String,
    },
    /// Delete a static user of a store tenant.
    DeleteUser { tenant: String, user: String },
    /// Revoke a user id (or username) of a tenant on every relay; its allocations end.
    Revoke { tenant: String, user: String },
    /// Lift a revocation.
    Unrevoke { tenant: String, user: String },
    /// Live allocations on this relay, or with --fleet on every relay that publishes its
    /// admin address in the store (the answer names those that did not answer).
    Allocations {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        fleet: bool,
    },
    /// End a live allocation by its id (from `allocations`).
    End { id: String },
    /// Hourly usage from the session records.
    Usage {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, default_value_t = 24)]
        hours: u32,
    },
}

fn enc(s: &str) -> String {
    crate::admin::encode(s)
}

impl Command {
    /// Method, path (after `/v1/admin/`) and body.
    fn request(&self) -> Result<(&'static str, String, Option<serde_json::Value>), String> {
        Ok(match self {
            Command::Tenants => ("GET", "tenants".into(), None),
            Command::PutTenant { name, file } => {
                let text = if file.as_os_str() == "-" {
                    std::io::read_to_string(std::io::stdin()).map_err(|e| format!("stdin: {e}"))?
                } else {
                    std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?
                };
                let doc: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
                ("PUT", format!("tenants/{}", enc(name)), Some(doc))
            }
            Command::AddTenant {
                name,
                realm,
                secrets,
                hostnames,
                api_keys,
            } => (
                "PUT",
                format!("tenants/{}", enc(name)),
                Some(
                    json!({ "realm": realm, "secrets": secrets, "hostnames": hostnames, "api_keys": api_keys }),
                ),
            ),
            Command::DeleteTenant { name } => ("DELETE", format!("tenants/{}", enc(name)), None),
            Command::PutUser {
                tenant,
                user,
                password,
            } => (
                "PUT",
                format!("tenants/{}/users/{}", enc(tenant), enc(user)),
                Some(json!({ "password": password })),
            ),
            Command::DeleteUser { tenant, user } => (
                "DELETE",
                format!("tenants/{}/users/{}", enc(tenant), enc(user)),
                None,
            ),
            Command::Revoke { tenant, user } => (
                "POST",
                format!("tenants/{}/revocations", enc(tenant)),
                Some(json!({ "user": user })),
            ),
            Command::Unrevoke { tenant, user } => (
                "DELETE",
                format!("tenants/{}/revocations/{}", enc(tenant), enc(user)),
                None,
            ),
            Command::Allocations {
                tenant,
                user,
                fleet,
            } => {
                let mut q = Vec::new();
                if *fleet {
                    q.push("fleet=1".to_owned());
                }
                if let Some(t) = tenant {
                    q.push(format!("tenant={}", enc(t)));
                }
                if let Some(u) = user {
                    q.push(format!("user={}", enc(u)));
                }
                let q = if q.is_empty() {
                    String::new()
                } else {
                    format!("?{}", q.join("&"))
                };
                ("GET", format!("allocations{q}"), None)
            }
            Command::End { id } => ("DELETE", format!("allocations/{}", enc(id)), None),
            Command::Usage { tenant, hours } => {
                let t = tenant
                    .as_ref()
                    .map(|t| format!("&tenant={}", enc(t)))
                    .unwrap_or_default();
                ("GET", format!("usage?hours={hours}{t}"), None)
            }
        })
    }
}

/// Runs `turnpike admin` with `args` (after `admin`); the exit status.
pub fn main(args: impl IntoIterator<Item = String>) -> std::process::ExitCode {
    let cli =
        match AdminCli::try_parse_from(std::iter::once("turnpike admin".to_owned()).chain(args)) {
            Ok(c) => c,
            Err(e) => e.exit(),
        };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("turnpike admin: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match rt.block_on(run(&cli)) {
        Ok((status, body)) => {
            let pretty = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| serde_json::to_string_pretty(&v).ok())
                .unwrap_or(body);
            if status < 300 {
                println!("{pretty}");
                std::process::ExitCode::SUCCESS
            } else {
                eprintln!("turnpike admin: {status}: {pretty}");
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("turnpike admin: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run(cli: &AdminCli) -> Result<(u16, String), String> {
    let (method, path, body) = cli.command.request()?;
    call(&cli.url, &cli.key, cli.ca.as_deref(), method, &path, body).await
}

/// One admin API call to the relay at `url` (its metrics listener, admin listener or an
/// HTTPS listener): the status and body of its answer.
pub async fn call(
    url: &str,
    key: &str,
    ca: Option<&std::path::Path>,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(u16, String), String> {
    let base: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let https = match base.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("{url}: http:// or https://")),
    };
    let host = base.host().ok_or(format!("{url}: no host"))?.to_owned();
    let port = base.port_u16().unwrap_or(if https { 443 } else { 80 });
    let prefix = base.path().trim_end_matches('/');
    let uri = format!("{prefix}/v1/admin/{path}");
    let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| format!("{host}:{port}: {e}"))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = hyper::Request::builder()
        .method(method)
        .uri(uri)
        .header(hyper::header::HOST, format!("{host}:{port}"))
        .header(hyper::header::AUTHORIZATION, format!("Bearer {key}"))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    if https {
        let tls = connector(ca)?;
        let name =
            rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
                .map_err(|e| format!("{host}: {e}"))?;
        let stream = tls
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        send(stream, req).await
    } else {
        send(tcp, req).await
    }
}

async fn send<S>(stream: S, req: hyper::Request<Full<Bytes>>) -> Result<(u16, String), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn connector(ca: Option<&std::path::Path>) -> Result<tokio_rustls::TlsConnector, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    let file = ca
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/ssl/certs/ca-certificates.crt"));
    for cert in
        CertificateDer::pem_file_iter(&file).map_err(|e| format!("{}: {e}", file.display()))?
    {
        let cert = cert.map_err(|e| format!("{}: {e}", file.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", file.display()))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

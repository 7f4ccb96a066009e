//! The credential service: `POST /v1/credentials` on the relay's HTTPS endpoint hands an
//! application short-lived TURN credentials for one tenant, ready to pass to
//! `RTCPeerConnection` as `iceServers`.
//!
//! The caller proves its tenant with an API key (`Authorization: Bearer KEY`); the
//! configuration holds only the key's SHA-256. The answer is an ephemeral username
//! `<expiry>:<user>` and its password, HMAC-SHA1 of the tenant's first shared secret, the
//! same scheme coturn's `use-auth-secret` checks, so every relay sharing the secret accepts
//! them. Wrong keys get 401, and a source that keeps sending wrong keys gets 429. Keys, secrets
//! and passwords are never logged.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde::Deserialize;

use crate::config::{ApiKeyHash, Listener, Settings, Transport};
use crate::http::Secure;
use turnpike_proto::auth::{ephemeral_password, ephemeral_username};
use turnpike_proto::limiter::{Limiter, Rates};

/// Wrong keys a source may send: two, then one a second.
const FAILURE_RATE: Rates = Rates {
    packets_per_sec: 1.0,
    bytes_per_sec: 1.0,
};
const MAX_SOURCES: usize = 16_384;
const MAX_BODY: usize = 4096;

/// One tenant as the service sees it.
#[derive(Debug, Clone)]
struct ServiceTenant {
    name: String,
    /// The secret new credentials are minted with (the tenant's first).
    secret: Option<crate::config::Secret>,
    api_keys: Vec<ApiKeyHash>,
    ttl: u64,
    max_ttl: u64,
    ice_urls: Vec<String>,
    hostnames: Vec<String>,
    revoked: Vec<String>,
}

#[derive(Debug, Clone)]
struct ServiceConfig {
    tenants: Vec<ServiceTenant>,
    /// The relay's listeners with their bound ports, for the URLs.
    listeners: Vec<Listener>,
}

/// What a caller asks for (all optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueRequest {
    /// The user id put in the username (quotas and revocation count by it).
    pub user: Option<String>,
    /// Seconds the credential stays valid, at most the tenant's maximum.
    pub ttl: Option<u64>,
}

/// Credentials issued for a tenant.
#[derive(Debug, serde::Serialize, PartialEq)]
pub struct Issued {
    pub tenant: String,
    pub username: String,
    pub password: String,
    pub ttl: u64,
    pub expires_at: u64,
    pub uris: Vec<String>,
}

/// Why a request got no credentials: the HTTP status and a message for the caller.
#[derive(Debug, PartialEq)]
pub struct Refusal(pub StatusCode, pub String);

pub struct CredentialService {
    config: arc_swap::ArcSwap<ServiceConfig>,
    failures: Mutex<Limiter>,
}

fn service_config(settings: &Settings, listeners: &[Listener]) -> ServiceConfig {
    ServiceConfig {
        tenants: settings
            .tenants
            .iter()
            .map(|t| ServiceTenant {
                name: t.name.clone(),
                secret: t.secrets.first().cloned(),
                api_keys: t.api_keys.clone(),
                ttl: t.credential_ttl,
                max_ttl: t.credential_max_ttl,
                ice_urls: t.ice_urls.clone(),
                hostnames: t.hostnames.clone(),
                revoked: t.revoked.clone(),
            })
            .collect(),
        listeners: listeners.to_vec(),
    }
}

impl CredentialService {
    /// `listeners`: the relay's listeners with the ports they bound.
    pub fn new(settings: &Settings, listeners: &[Listener]) -> Self {
        CredentialService {
            config: arc_swap::ArcSwap::from_pointee(service_config(settings, listeners)),
            failures: Mutex::new(Limiter::new(FAILURE_RATE, MAX_SOURCES)),
        }
    }

    /// Takes new keys, secrets and TTLs from a reloaded configuration.
    pub fn reload(&self, settings: &Settings) {
        let listeners = self.config.load().listeners.clone();
        self.config
            .store(Arc::new(service_config(settings, &listeners)));
    }

    /// Whether any tenant has API keys, that is whether the service is on.
    pub fn enabled(&self) -> bool {
        self.config
            .load()
            .tenants
            .iter()
            .any(|t| !t.api_keys.is_empty())
    }

    /// Issues credentials to the holder of `key`. `host` is the name the caller reached the
    /// relay by (the HTTP Host), used in the URLs when the tenant names no host of its own.
    pub fn issue(
        &self,
        source: IpAddr,
        key: Option<&str>,
        request: &IssueRequest,
        host: Option<&str>,
        unix_now: u64,
        now: Instant,
    ) -> Result<Issued, Refusal> {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.exhausted(source, now) {
            return Err(Refusal(
                StatusCode::TOO_MANY_REQUESTS,
                "too many wrong API keys from this address; wait and retry".into(),
            ));
        }
        let config = self.config.load();
        let hash = key.map(ApiKeyHash::of);
        let Some(tenant) = hash.and_then(|h| config.tenants.iter().find(|t| h.is_in(&t.api_keys)))
        else {
            failures.allow(source, 0, now);
            return Err(Refusal(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key".into(),
            ));
        };
        drop(failures);
        self.mint(
            &config,
            tenant,
            request.user.as_deref(),
            request.ttl,
            host,
            unix_now,
        )
    }

    fn mint(
        &self,
        config: &ServiceConfig,
        tenant: &ServiceTenant,
        user: Option<&str>,
        ttl: Option<u64>,
        host: Option<&str>,
        unix_now: u64,
    ) -> Result<Issued, Refusal> {
        let Some(secret) = &tenant.secret else {
            return Err(Refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "the tenant has no shared secret".into(),
            ));
        };
        let ttl = ttl.unwrap_or(tenant.ttl).clamp(1, tenant.max_ttl);
        let user = match user {
            Some(u) => {
                let ok = !u.is_empty()
                    && u.len() <= 64
                    && u.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.@+".contains(&b));
                if !ok {
                    return Err(Refusal(
                        StatusCode::BAD_REQUEST,
                        "user: 1-64 letters, digits, '-', '_', '.', '@' or '+'".into(),
                    ));
                }
                u.to_owned()
            }
            None => {
                let mut id = [0u8; 8];
                rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut id);
                id.iter().map(|b| format!("{b:02x}")).collect()
            }
        };
        if tenant.revoked.contains(&user) {
            return Err(Refusal(
                StatusCode::FORBIDDEN,
                "this user is revoked".into(),
            ));
        }
        let expires_at = unix_now + ttl;
        let username = ephemeral_username(expires_at, Some(&user));
        let password = ephemeral_password(&secret.0, &username);
        let uris = tenant_uris(config, tenant, host);
        Ok(Issued {
            tenant: tenant.name.clone(),
            username,
            password,
            ttl,
            expires_at,
            uris,
        })
    }

    /// The TURN URLs credentials of `tenant` come with, for a request to `host`.
    pub fn uris(&self, tenant: &str, host: Option<&str>) -> Vec<String> {
        let config = self.config.load();
        config
            .tenants
            .iter()
            .find(|t| t.name == tenant)
            .map(|t| tenant_uris(&config, t, host))
            .unwrap_or_default()
    }

    /// Credentials of `tenant` for a caller that needs no key (the browser test page), for
    /// user id `user`, with the tenant's TTL.
    pub fn issue_unkeyed(
        &self,
        tenant: &str,
        user: &str,
        host: Option<&str>,
        unix_now: u64,
    ) -> Option<Issued> {
        let config = self.config.load();
        let t = config.tenants.iter().find(|t| t.name == tenant)?;
        self.mint(&config, t, Some(user), None, host, unix_now).ok()
    }

    /// `POST /v1/credentials`.
    pub fn routes(self: Arc<Self>) -> Router {
        Router::new().route(
            "/v1/credentials",
            post(move |req: Request| {
                let service = Arc::clone(&self);
                async move { service.handle(req).await }
            }),
        )
    }

    async fn handle(&self, req: Request) -> Response {
        let secure = req.extensions().get::<Secure>().is_some_and(|s| s.0);
        let source = req
            .extensions()
            .get::<axum::extract::ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let (parts, body) = req.into_parts();
        if !secure {
            return refuse(Refusal(
                StatusCode::FORBIDDEN,
                "the credential service answers over HTTPS only".into(),
            ));
        }
        let Some(source) = source else {
            return refuse(Refusal(StatusCode::INTERNAL_SERVER_ERROR, "no peer".into()));
        };
        let body = match axum::body::to_bytes(body, MAX_BODY).await {
            Ok(b) => b,
            Err(_) => {
                return refuse(Refusal(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body too large".into(),
                ))
            }
        };
        let request: IssueRequest = if body.iter().all(u8::is_ascii_whitespace) {
            IssueRequest::default()
        } else {
            match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => {
                    return refuse(Refusal(
                        StatusCode::BAD_REQUEST,
                        format!("body: expected {{\"user\": ..., \"ttl\": ...}}: {e}"),
                    ))
                }
            }
        };
        let key = bearer(&parts.headers);
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(strip_port);
        let unix_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        match self.issue(source, key, &request, host, unix_now, Instant::now()) {
            Ok(issued) => {
                tracing::debug!(tenant = %issued.tenant, ttl = issued.ttl, "credentials issued");
                let body = serde_json::json!({
                    "username": issued.username,
                    "password": issued.password,
                    "ttl": issued.ttl,
                    "expires_at": issued.expires_at,
                    "uris": issued.uris,
                    "iceServers": [{
                        "urls": issued.uris,
                        "username": issued.username,
                        "credential": issued.password,
                    }],
                });
                json(StatusCode::OK, &body)
            }
            Err(r) => refuse(r),
        }
    }
}

pub(crate) fn json(status: StatusCode, body: &serde_json::Value) -> Response {
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn refuse(Refusal(status, message): Refusal) -> Response {
    let mut r = json(status, &serde_json::json!({ "error": message }));
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

/// The key of `Authorization: Bearer KEY`.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(key.trim())
}

/// `relay.example.org:443` → `relay.example.org`; `[2001:db8::1]:443` → `[2001:db8::1]`.
pub fn strip_port(host: &str) -> &str {
    match host.rfind(':') {
        Some(i)
            if !host[i..].contains(']')
                && (host.starts_with('[') || host[..i].find(':').is_none()) =>
        {
            &host[..i]
        }
        _ => host,
    }
}

/// The TURN URLs of the relay's listeners under `host`: UDP and TCP as `turn:`, TLS as
/// `turns:` (RFC 7065).
/// A tenant's configured ICE URLs, else this relay's listeners under the tenant's first host
/// name (or the one asked for).
fn tenant_uris(config: &ServiceConfig, tenant: &ServiceTenant, host: Option<&str>) -> Vec<String> {
    if !tenant.ice_urls.is_empty() {
        return tenant.ice_urls.clone();
    }
    let host = tenant
        .hostnames
        .first()
        .map(String::as_str)
        .or(host)
        .unwrap_or("localhost");
    urls(host, &config.listeners)
}

fn urls(host: &str, listeners: &[Listener]) -> Vec<String> {
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let mut out: Vec<String> = Vec::new();
    for l in listeners {
        let port = l.addr.port();
        let url = match l.transport {
            Transport::Udp => format!("turn:{host}:{port}?transport=udp"),
            Transport::Tcp => format!("turn:{host}:{port}?transport=tcp"),
            Transport::Tls => format!("turns:{host}:{port}?transport=tcp"),
        };
        if !out.contains(&url) {
            out.push(url);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, FileConfig};

    fn service(toml: &str) -> CredentialService {
        let f = FileConfig::from_toml("t.toml", toml).expect("toml");
        let s = Settings::resolve(f, &Cli::default(), "t.toml".into()).expect("settings");
        let listeners: Vec<Listener> = [
            "udp://0.0.0.0:3478",
            "tcp://0.0.0.0:3478",
            "tls://0.0.0.0:443",
        ]
        .iter()
        .map(|l| crate::config::parse_listen(l).expect("listen"))
        .collect();
        CredentialService::new(&s, &listeners)
    }

    fn hash(key: &str) -> String {
        let h = ApiKeyHash::of(key);
        format!(
            "sha256:{}",
            h.0.iter().map(|b| format!("{b:02x}")).collect::<String>()
        )
    }

    fn two_tenants() -> CredentialService {
        service(&format!(
            "listen = [\"udp://127.0.0.1:0\"]\n\
             [[tenant]]\nname = \"acme\"\nrealm = \"acme.example\"\nsecrets = [\"s-acme\"]\n\
             api_keys = [\"{}\"]\ncredential_max_ttl_secs = 600\n\
             hostnames = [\"turn.acme.example\"]\n\
             [[tenant]]\nname = \"globex\"\nrealm = \"globex.example\"\nsecrets = [\"s-globex\"]\n\
             api_keys = [\"{}\"]\n",
            hash("acme-key"),
            hash("globex-key")
        ))
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 9));

    #[test]
    fn a_key_gets_its_tenants_credentials() {
        let s = two_tenants();
        let now = Instant::now();
        let req = IssueRequest {
            user: Some("alice".into()),
            ttl: Some(100_000),
        };
        let a = s
            .issue(IP, Some("acme-key"), &req, Some("relay.example"), 1000, now)
            .expect("acme");
        assert_eq!(a.tenant, "acme");
        assert_eq!(a.ttl, 600, "capped at the tenant's maximum");
        assert_eq!(a.username, "1600:alice");
        assert_eq!(a.password, ephemeral_password("s-acme", "1600:alice"));
        assert_eq!(
            a.uris,
            vec![
                "turn:turn.acme.example:3478?transport=udp",
                "turn:turn.acme.example:3478?transport=tcp",
                "turns:turn.acme.example:443?transport=tcp",
            ]
        );
        let g = s
            .issue(
                IP,
                Some("globex-key"),
                &IssueRequest::default(),
                Some("relay.example"),
                1000,
                now,
            )
            .expect("globex");
        assert_eq!((g.tenant.as_str(), g.ttl), ("globex", 3600));
        assert_eq!(g.uris[2], "turns:relay.example:443?transport=tcp");
        let user = g.username.split_once(':').expect("expiry:user").1;
        assert_eq!(user.len(), 16, "a random user id when none is asked for");
    }

    #[test]
    fn wrong_keys_get_401_then_429() {
        let s = two_tenants();
        let now = Instant::now();
        let none = IssueRequest::default();
        for _ in 0..2 {
            assert_eq!(
                s.issue(IP, Some("guess"), &none, None, 0, now).map(|_| ()),
                Err(Refusal(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong API key".into()
                ))
            );
        }
        let r = s.issue(IP, Some("acme-key"), &none, None, 0, now);
        assert_eq!(
            r.map(|_| ()).map_err(|e| e.0),
            Err(StatusCode::TOO_MANY_REQUESTS)
        );
        // Another source is not held back, and the limit wears off.
        let other: IpAddr = "198.51.100.1".parse().expect("ip");
        assert!(s
            .issue(other, Some("acme-key"), &none, None, 0, now)
            .is_ok());
        let later = now + std::time::Duration::from_secs(1);
        assert!(s.issue(IP, Some("acme-key"), &none, None, 0, later).is_ok());
        assert_eq!(
            s.issue(IP, None, &none, None, 0, later)
                .map(|_| ())
                .map_err(|e| e.0),
            Err(StatusCode::UNAUTHORIZED)
        );
        let bad_user = IssueRequest {
            user: Some("a:b".into()),
            ttl: None,
        };
        assert_eq!(
            s.issue(other, Some("acme-key"), &bad_user, None, 0, now)
                .map_err(|e| e.0)
                .map(|_| ()),
            Err(StatusCode::BAD_REQUEST)
        );
    }

    #[test]
    fn hosts_lose_their_port() {
        assert_eq!(strip_port("relay.example:443"), "relay.example");
        assert_eq!(strip_port("relay.example"), "relay.example");
        assert_eq!(strip_port("[2001:db8::1]:443"), "[2001:db8::1]");
        assert_eq!(strip_port("[2001:db8::1]"), "[2001:db8::1]");
        assert_eq!(strip_port("127.0.0.1:8443"), "127.0.0.1");
    }
}

//! The configuration file's format, as serde reads it: one struct per table, unknown keys
//! refused, every default a named function. Values are checked in `resolve`.

use std::net::IpAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::Secret;
use crate::Error;

/// The configuration file. Every key is documented in `config/turnpike.example.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default = "default_realm")]
    pub realm: String,
    #[serde(default)]
    pub listen: Vec<String>,
    #[serde(default)]
    pub relay_ips: Vec<IpAddr>,
    #[serde(default)]
    pub external_ips: Vec<String>,
    #[serde(default = "default_relay_ports")]
    pub relay_ports: String,
    #[serde(default)]
    pub shared_relay_ports: u16,
    #[serde(default)]
    pub threads: usize,
    #[serde(default = "default_software")]
    pub software: String,
    #[serde(default)]
    pub software_unauthenticated: bool,
    #[serde(default = "default_log_format")]
    pub log_format: String,
    #[serde(default)]
    pub metrics_listen: Option<String>,
    #[serde(default = "default_drain_grace")]
    pub drain_grace_secs: u64,
    #[serde(default = "default_socket_buffer")]
    pub socket_buffer_bytes: usize,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub allocation: AllocationConfig,
    #[serde(default)]
    pub peer: PeerConfig,
    #[serde(default)]
    pub quota: QuotaConfig,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub https: HttpsConfig,
    #[serde(default)]
    pub tcp: TcpConfig,
    #[serde(default)]
    pub echo: EchoConfig,
    /// `[[tenant]]` tables.
    #[serde(default)]
    pub tenant: Vec<TenantConfig>,
    #[serde(default)]
    pub test_page: TestPageConfig,
    #[serde(default)]
    pub store: super::fleet::StoreConfig,
    #[serde(default)]
    pub admin: super::fleet::AdminConfig,
    #[serde(default)]
    pub sessions: super::fleet::SessionsConfig,
    #[serde(default)]
    pub redirect: super::fleet::RedirectConfig,
}

/// `[test_page]`: the browser network test at `/test`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestPageConfig {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "default_test_ttl")]
    pub ttl_secs: u64,
    #[serde(default = "default_test_allocations")]
    pub allocations: u32,
    #[serde(default = "default_test_bps")]
    pub bytes_per_sec: u64,
    #[serde(default = "default_min_mbps")]
    pub min_mbps: f64,
    #[serde(default)]
    pub ice_urls: Vec<String>,
    #[serde(default)]
    pub regions: Vec<RegionConfig>,
}

impl Default for TestPageConfig {
    fn default() -> Self {
        TestPageConfig {
            enabled: false,
            ttl_secs: default_test_ttl(),
            allocations: default_test_allocations(),
            bytes_per_sec: default_test_bps(),
            min_mbps: default_min_mbps(),
            ice_urls: Vec::new(),
            regions: Vec::new(),
        }
    }
}

/// One `[[test_page.regions]]`: another relay of the deployment, whose distance the page
/// measures.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    pub name: String,
    /// Its HTTPS base URL, e.g. `https://relay-eu.example.org`.
    pub url: String,
}

fn default_test_ttl() -> u64 {
    300
}
fn default_test_allocations() -> u32 {
    64
}
fn default_test_bps() -> u64 {
    4_000_000
}
fn default_min_mbps() -> f64 {
    6.0
}

/// `[echo]`: the echo services, all off unless configured.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EchoConfig {
    #[serde(default)]
    pub udp: Vec<String>,
    #[serde(default)]
    pub tcp: Vec<String>,
    #[serde(default)]
    pub websocket: bool,
    #[serde(default)]
    pub long_poll_max_secs: u64,
    #[serde(default = "default_echo_pps")]
    pub packets_per_sec: u32,
    #[serde(default = "default_echo_bps")]
    pub bytes_per_sec: u64,
}

impl Default for EchoConfig {
    fn default() -> Self {
        EchoConfig {
            udp: Vec::new(),
            tcp: Vec::new(),
            websocket: false,
            long_poll_max_secs: 0,
            packets_per_sec: default_echo_pps(),
            bytes_per_sec: default_echo_bps(),
        }
    }
}

fn default_echo_pps() -> u32 {
    100
}
fn default_echo_bps() -> u64 {
    1_000_000
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpsConfig {
    #[serde(default)]
    pub upstream: Option<String>,
    #[serde(default)]
    pub web_hostnames: Vec<String>,
    #[serde(default)]
    pub metrics: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpConfig {
    #[serde(default = "default_per_ip")]
    pub max_connections_per_ip: u32,
    #[serde(default = "default_idle")]
    pub idle_timeout_secs: u64,
    #[serde(default = "default_handshake")]
    pub handshake_timeout_secs: u64,
    #[serde(default = "default_unallocated")]
    pub max_unallocated_connections: usize,
    #[serde(default = "default_unallocated_lifetime")]
    pub unallocated_lifetime_secs: u64,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            max_connections_per_ip: default_per_ip(),
            idle_timeout_secs: default_idle(),
            handshake_timeout_secs: default_handshake(),
            max_unallocated_connections: default_unallocated(),
            unallocated_lifetime_secs: default_unallocated_lifetime(),
        }
    }
}

fn default_unallocated_lifetime() -> u64 {
    30
}
fn default_per_ip() -> u32 {
    64
}
fn default_idle() -> u64 {
    60
}
fn default_handshake() -> u64 {
    10
}
fn default_unallocated() -> usize {
    4096
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default)]
    pub users: Vec<UserConfig>,
    #[serde(default)]
    pub secrets: Vec<Secret>,
    #[serde(default = "default_nonce_lifetime")]
    pub nonce_lifetime_secs: u64,
    #[serde(default = "default_unauthenticated_replies")]
    pub unauthenticated_replies_per_sec: f64,
    /// Credential-service keys of the default tenant, hashed.
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// Revoked user ids or usernames of the default tenant.
    #[serde(default)]
    pub revoked: Vec<String>,
    /// A file of revocations for every tenant, re-read when it changes.
    #[serde(default)]
    pub revoked_file: Option<PathBuf>,
    #[serde(default)]
    pub credential_ttl_secs: Option<u64>,
    #[serde(default)]
    pub credential_max_ttl_secs: Option<u64>,
    #[serde(default)]
    pub ice_urls: Vec<String>,
    /// What the relay's nonces are keyed by: one value for every relay of a fleet, so that
    /// a client redirected to a sibling (300) is not refused its nonce there.
    #[serde(default)]
    pub nonce_secret: Option<Secret>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            users: Vec::new(),
            secrets: Vec::new(),
            nonce_lifetime_secs: default_nonce_lifetime(),
            unauthenticated_replies_per_sec: default_unauthenticated_replies(),
            api_keys: Vec::new(),
            revoked: Vec::new(),
            revoked_file: None,
            credential_ttl_secs: None,
            credential_max_ttl_secs: None,
            ice_urls: Vec::new(),
            nonce_secret: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    pub password: Secret,
}

impl std::fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:<redacted>", self.name)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllocationConfig {
    #[serde(default = "default_lifetime")]
    pub default_lifetime_secs: u32,
    #[serde(default = "default_max_lifetime")]
    pub max_lifetime_secs: u32,
    #[serde(default = "default_max_permissions")]
    pub max_permissions: usize,
    #[serde(default = "default_max_tcp_connections")]
    pub max_tcp_connections: usize,
    #[serde(default = "default_max_peer_endpoints")]
    pub max_peer_endpoints: usize,
}

impl Default for AllocationConfig {
    fn default() -> Self {
        AllocationConfig {
            default_lifetime_secs: default_lifetime(),
            max_lifetime_secs: default_max_lifetime(),
            max_permissions: default_max_permissions(),
            max_tcp_connections: default_max_tcp_connections(),
            max_peer_endpoints: default_max_peer_endpoints(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaConfig {
    /// Unset: unlimited with dedicated relay ports, [`SHARED_TOTAL_ALLOCATIONS`] with shared
    /// ones; 0: unlimited.
    #[serde(default)]
    pub total_allocations: Option<u32>,
    /// Unset: unlimited with dedicated relay ports, [`SHARED_USER_ALLOCATIONS`] with shared
    /// ones; 0: unlimited.
    #[serde(default)]
    pub user_allocations: Option<u32>,
    #[serde(default)]
    pub allocation_bytes_per_sec: u64,
    #[serde(default)]
    pub user_bytes_per_sec: u64,
}

fn default_realm() -> String {
    "turnpike".into()
}
fn default_relay_ports() -> String {
    "49152-65535".into()
}
fn default_software() -> String {
    concat!("turnpike/", env!("CARGO_PKG_VERSION")).into()
}
fn default_log_format() -> String {
    "text".into()
}
fn default_drain_grace() -> u64 {
    30
}
fn default_socket_buffer() -> usize {
    4 << 20
}
fn default_nonce_lifetime() -> u64 {
    600
}
fn default_unauthenticated_replies() -> f64 {
    50.0
}
fn default_lifetime() -> u32 {
    600
}
fn default_max_lifetime() -> u32 {
    3600
}
fn default_max_permissions() -> usize {
    64
}
fn default_max_tcp_connections() -> usize {
    32
}
/// coturn's `--multiplex-peer-max-peers` default.
fn default_max_peer_endpoints() -> usize {
    256
}

/// With shared relay ports, where the port range no longer bounds them: the most allocations
/// on one relay, and of one user, unless `[quota]` says otherwise.
pub const SHARED_TOTAL_ALLOCATIONS: u32 = 100_000;
pub const SHARED_USER_ALLOCATIONS: u32 = 1_000;

impl FileConfig {
    /// Parses TOML; errors name the key path.
    pub fn from_toml(source: &str, text: &str) -> Result<Self, Error> {
        let de = toml::de::Deserializer::parse(text).map_err(|e| Error::Config {
            file: source.to_owned(),
            key: String::new(),
            reason: e.message().trim().to_owned() + &line_of(text, e.span()),
        })?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let line = line_of_key(text, &key).map(|l| format!(" (line {l})"));
            Error::Config {
                file: source.to_owned(),
                reason: inner.message().trim().to_owned()
                    + &line.unwrap_or_else(|| line_of(text, inner.span())),
                key: if key == "." { String::new() } else { key },
            }
        })
    }
}

/// The line where the last segment of a key path is assigned, if it is written `key = …`.
fn line_of_key(text: &str, path: &str) -> Option<usize> {
    let last = path.rsplit('.').next()?.split('[').next()?;
    if last.is_empty() {
        return None;
    }
    text.lines()
        .position(|l| {
            l.trim_start()
                .strip_prefix(last)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

fn line_of(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(s) => format!(
            " (line {})",
            text[..s.start.min(text.len())].lines().count().max(1)
        ),
        None => String::new(),
    }
}

/// One `[[tenant]]`. Its `Debug` shows no secret.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
    pub realm: String,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub origins: Vec<String>,
    #[serde(default)]
    pub users: Vec<UserConfig>,
    #[serde(default)]
    pub secrets: Vec<Secret>,
    #[serde(default)]
    pub api_keys: Vec<String>,
    #[serde(default)]
    pub revoked: Vec<String>,
    #[serde(default)]
    pub credential_ttl_secs: Option<u64>,
    #[serde(default)]
    pub credential_max_ttl_secs: Option<u64>,
    #[serde(default)]
    pub ice_urls: Vec<String>,
    #[serde(default)]
    pub quota: TenantQuotaConfig,
    #[serde(default)]
    pub peer: PeerConfig,
}

impl std::fmt::Debug for TenantConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantConfig")
            .field("name", &self.name)
            .field("realm", &self.realm)
            .finish_non_exhaustive()
    }
}

/// `[tenant.quota]`: unset per-user and per-allocation keys inherit `[quota]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantQuotaConfig {
    #[serde(default)]
    pub allocations: u32,
    #[serde(default)]
    pub bytes_per_sec: u64,
    pub user_allocations: Option<u32>,
    pub allocation_bytes_per_sec: Option<u64>,
    pub user_bytes_per_sec: Option<u64>,
}

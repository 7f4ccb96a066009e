//! Configuration: a TOML file with every key documented (see `config/turnpike.example.toml`),
//! command-line flags for the common keys, and the embedded default used when neither names a
//! file. Errors name the file, the key and the reason.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use clap::Parser;
use ipnet::IpNet;
use serde::Deserialize;

use crate::Error;

mod tenant;
pub use tenant::{read_revocations, ApiKeyHash, TenantSettings};

/// The embedded default: UDP 3478 on every interface, peer policy on, and (since it names no
/// credentials) a random shared secret generated at start.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// Command-line flags. Flags override the file; repeatable flags add to the file's lists.
/// No `Debug`: it would print `--user` passwords and `--auth-secret` values.
#[derive(Parser, Default)]
#[command(name = "turnpike", version, about = "TURN/STUN relay", long_about = None)]
pub struct Cli {
    /// TOML configuration file; without it the embedded default is used.
    #[arg(long, short = 'c', value_name = "FILE", env = "TURNPIKE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Listener, `udp://IP:PORT`, `tcp://IP:PORT` or `tls://IP:PORT`, with `?proxy-protocol` on
    /// stream listeners behind a load balancer (repeatable; port 0 binds an ephemeral port).
    #[arg(long, value_name = "URL")]
    pub listen: Vec<String>,
    /// TLS certificate chain (PEM) for `tls://` listeners.
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// TLS private key (PEM) for `tls://` listeners.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Existing web server that HTTPS on TLS listeners is passed to, `IP:PORT` (TLS untouched).
    #[arg(long = "https-upstream", value_name = "IP:PORT")]
    pub https_upstream: Option<String>,
    /// Realm of the long-term credentials.
    #[arg(long, short = 'r')]
    pub realm: Option<String>,
    /// Static user `NAME:PASSWORD` (repeatable).
    #[arg(long = "user", short = 'u', value_name = "NAME:PASSWORD")]
    pub users: Vec<String>,
    /// Shared secret for ephemeral credentials (repeatable, to rotate).
    #[arg(
        long = "auth-secret",
        alias = "static-auth-secret",
        value_name = "SECRET",
        env = "TURNPIKE_AUTH_SECRET",
        value_delimiter = ','
    )]
    pub auth_secrets: Vec<String>,
    /// Address relay sockets bind to (repeatable: one IPv4, one IPv6).
    #[arg(long = "relay-ip", value_name = "IP")]
    pub relay_ips: Vec<IpAddr>,
    /// Address advertised to clients, `PUBLIC` or `PUBLIC/PRIVATE` as coturn takes it (repeatable).
    #[arg(long = "external-ip", value_name = "IP[/IP]")]
    pub external_ips: Vec<String>,
    /// Relay port range `MIN-MAX`.
    #[arg(long = "relay-ports", value_name = "MIN-MAX")]
    pub relay_ports: Option<String>,
    /// Allow relaying to this network, even if the defaults refuse it (repeatable).
    #[arg(long = "allow-peer", value_name = "CIDR")]
    pub allow_peer: Vec<String>,
    /// Refuse relaying to this network (repeatable).
    #[arg(long = "deny-peer", value_name = "CIDR")]
    pub deny_peer: Vec<String>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served, `IP:PORT`.
    #[arg(long = "metrics-listen", value_name = "IP:PORT")]
    pub metrics_listen: Option<String>,
    /// Log format: `text` or `json`.
    #[arg(long = "log-format", value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Most allocations per user (coturn: user-quota).
    #[arg(long = "user-quota", value_name = "N")]
    pub user_quota: Option<u32>,
    /// Most allocations on this relay (coturn: total-quota).
    #[arg(long = "total-quota", value_name = "N")]
    pub total_quota: Option<u32>,
    /// Bytes per second per allocation (coturn: max-bps).
    #[arg(long = "max-bps", value_name = "BYTES")]
    pub max_bps: Option<u64>,
    /// Longest allocation lifetime granted, seconds (coturn: max-allocate-lifetime).
    #[arg(long = "max-allocate-lifetime", value_name = "SECS")]
    pub max_lifetime: Option<u32>,
    /// Worker threads (0: one per core).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Seconds existing allocations are served after SIGTERM.
    #[arg(long = "drain-grace", value_name = "SECS")]
    pub drain_grace: Option<u64>,
    /// UDP echo service on `IP:PORT` or a port range `IP:MIN-MAX` (repeatable; adds to
    /// `echo.udp`).
    #[arg(long = "echo-udp", value_name = "SPEC")]
    pub echo_udp: Vec<String>,
    /// TCP echo service on `IP:PORT` or a port range `IP:MIN-MAX` (repeatable; adds to
    /// `echo.tcp`).
    #[arg(long = "echo-tcp", value_name = "SPEC")]
    pub echo_tcp: Vec<String>,
    /// WebSocket echo at `/echo/ws` on the HTTP endpoints.
    #[arg(long = "echo-websocket")]
    pub echo_websocket: bool,
    /// Longest hold of the long-poll echo at `/echo/poll`, seconds (0: off).
    #[arg(long = "echo-long-poll-max", value_name = "SECS")]
    pub echo_long_poll_max: Option<u64>,
    /// Check the configuration, print it (secrets hidden) and exit.
    #[arg(long = "check-config")]
    pub check_config: bool,
}

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
    pub tenant: Vec<tenant::TenantConfig>,
    #[serde(default)]
    pub test_page: TestPageConfig,
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

/// The browser test page, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct TestPageSettings {
    pub ttl_secs: u64,
    pub min_mbps: f64,
    /// The most throughput the page can measure (`bytes_per_sec`), None when unlimited.
    pub max_mbps: Option<f64>,
    /// TURN URLs the page tests; empty: one per listener.
    pub ice_urls: Vec<String>,
    pub regions: Vec<RegionConfig>,
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

/// Most ports the echo services bind, per transport.
pub const MAX_ECHO_PORTS: usize = 1024;
/// Longest hold of the long-poll echo.
pub const MAX_LONG_POLL_SECS: u64 = 3600;

/// The echo services, validated: every port of every range spelled out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EchoSettings {
    pub udp: Vec<SocketAddr>,
    pub tcp: Vec<SocketAddr>,
    pub websocket: bool,
    /// 0: the long-poll echo is off.
    pub long_poll_max_secs: u64,
    pub packets_per_sec: u32,
    pub bytes_per_sec: u64,
}

impl EchoSettings {
    /// Whether the HTTP echo routes exist.
    pub fn http(&self) -> bool {
        self.websocket || self.long_poll_max_secs > 0
    }
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
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            max_connections_per_ip: default_per_ip(),
            idle_timeout_secs: default_idle(),
            handshake_timeout_secs: default_handshake(),
            max_unallocated_connections: default_unallocated(),
        }
    }
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
}

impl Default for AllocationConfig {
    fn default() -> Self {
        AllocationConfig {
            default_lifetime_secs: default_lifetime(),
            max_lifetime_secs: default_max_lifetime(),
            max_permissions: default_max_permissions(),
            max_tcp_connections: default_max_tcp_connections(),
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
    #[serde(default)]
    pub total_allocations: u32,
    #[serde(default)]
    pub user_allocations: u32,
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

/// A password or shared secret: its `Debug` never shows it, so it cannot reach a log. The
/// file's secrets are read into it directly, so no configuration type holds one in the clear.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

impl Transport {
    pub fn scheme(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }
}

/// One `listen` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    pub transport: Transport,
    pub addr: SocketAddr,
    /// Connections start with a PROXY protocol v1 or v2 header naming the real client.
    pub proxy_protocol: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// A validated configuration, ready to run.
#[derive(Debug)]
pub struct Settings {
    pub realm: String,
    pub listen: Vec<Listener>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub https_upstream: Option<SocketAddr>,
    pub web_hostnames: Vec<String>,
    pub https_metrics: bool,
    pub max_connections_per_ip: u32,
    pub tcp_idle_timeout_secs: u64,
    pub tcp_handshake_timeout_secs: u64,
    pub max_unallocated_connections: usize,
    pub echo: EchoSettings,
    pub relay_ips: Vec<IpAddr>,
    /// (advertised, bound) pairs.
    pub external_ips: Vec<(IpAddr, Option<IpAddr>)>,
    pub relay_ports: (u16, u16),
    pub threads: usize,
    pub software: Option<String>,
    pub software_unauthenticated: bool,
    pub unauthenticated_replies_per_sec: f64,
    pub log_format: LogFormat,
    pub metrics_listen: Option<SocketAddr>,
    pub drain_grace_secs: u64,
    pub socket_buffer_bytes: usize,
    pub users: Vec<(String, Secret)>,
    pub secrets: Vec<Secret>,
    pub nonce_lifetime_secs: u64,
    pub default_lifetime: u32,
    pub max_lifetime: u32,
    pub max_permissions: usize,
    pub max_tcp_connections: usize,
    pub allow_peer: Vec<IpNet>,
    pub deny_peer: Vec<IpNet>,
    pub quotas: crate::proto::quota::Quotas,
    /// No credentials were configured, so a random secret was generated.
    pub generated_secret: bool,
    /// Every tenant: the default tenant first (the top-level realm, `[auth]`, `[quota]`) unless
    /// `[[tenant]]` tables exist and `[auth]` names no credentials, then each `[[tenant]]`.
    pub tenants: Vec<TenantSettings>,
    /// `auth.revoked_file`, already applied to `tenants`.
    pub revoked_file: Option<PathBuf>,
    /// `[test_page]` when enabled; its tenant is in `tenants`.
    pub test_page: Option<TestPageSettings>,
    /// What is odd but not fatal (a bad line of the revocation file, a setting that cannot
    /// work as meant), logged at start and on each reload.
    pub warnings: Vec<String>,
    pub source: String,
}

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

impl Settings {
    /// Reads the file the flags name (or the embedded default) and applies the flags.
    pub fn load(cli: &Cli) -> Result<Self, Error> {
        let (source, text) = match &cli.config {
            Some(p) => (p.display().to_string(), read(p)?),
            None => ("<embedded default>".to_owned(), DEFAULT_TOML.to_owned()),
        };
        let file = FileConfig::from_toml(&source, &text)?;
        Self::resolve(file, cli, source)
    }

    pub(crate) fn resolve(f: FileConfig, cli: &Cli, source: String) -> Result<Self, Error> {
        let file_err = |key: &str, reason: String| Error::Config {
            file: source.clone(),
            key: key.to_owned(),
            reason,
        };
        let flag_err = |flag: &str, reason: String| Error::Config {
            file: "command line".to_owned(),
            key: flag.to_owned(),
            reason,
        };
        let listen = if cli.listen.is_empty() {
            parse_all(&f.listen, parse_listen).map_err(|e| file_err("listen", e))?
        } else {
            parse_all(&cli.listen, parse_listen).map_err(|e| flag_err("--listen", e))?
        };
        if listen.is_empty() {
            return Err(file_err("listen", "no listener configured".into()));
        }
        let relay_ips = if cli.relay_ips.is_empty() {
            f.relay_ips
        } else {
            cli.relay_ips.clone()
        };
        let tls_cert = cli.cert.clone().or(f.tls.cert);
        let tls_key = cli.key.clone().or(f.tls.key);
        if listen.iter().any(|l| l.transport == Transport::Tls)
            && (tls_cert.is_none() || tls_key.is_none())
        {
            let reason = "tls:// listeners need tls.cert and tls.key (--cert, --key)".to_owned();
            return Err(if cli.listen.is_empty() {
                file_err("tls", reason)
            } else {
                flag_err("--listen", reason)
            });
        }
        let https_upstream = match (&cli.https_upstream, &f.https.upstream) {
            (Some(u), _) => Some(
                u.parse()
                    .map_err(|e| flag_err("--https-upstream", format!("{e}: {u:?}")))?,
            ),
            (None, Some(u)) if !u.is_empty() => Some(
                u.parse()
                    .map_err(|e| file_err("https.upstream", format!("{e}: {u:?}")))?,
            ),
            _ => None,
        };
        for (key, zero) in [
            (
                "tcp.max_connections_per_ip",
                f.tcp.max_connections_per_ip == 0,
            ),
            ("tcp.idle_timeout_secs", f.tcp.idle_timeout_secs == 0),
            (
                "tcp.handshake_timeout_secs",
                f.tcp.handshake_timeout_secs == 0,
            ),
            (
                "tcp.max_unallocated_connections",
                f.tcp.max_unallocated_connections == 0,
            ),
            (
                "allocation.max_tcp_connections",
                f.allocation.max_tcp_connections == 0,
            ),
        ] {
            if zero {
                return Err(file_err(key, "must be above 0".into()));
            }
        }
        let external_ips = if cli.external_ips.is_empty() {
            parse_all(&f.external_ips, parse_external).map_err(|e| file_err("external_ips", e))?
        } else {
            parse_all(&cli.external_ips, parse_external)
                .map_err(|e| flag_err("--external-ip", e))?
        };
        let relay_ports = match &cli.relay_ports {
            Some(r) => parse_ports(r).map_err(|e| flag_err("--relay-ports", e))?,
            None => parse_ports(&f.relay_ports).map_err(|e| file_err("relay_ports", e))?,
        };
        let log_format = match cli.log_format.as_deref() {
            Some(l) => parse_log_format(l).map_err(|e| flag_err("--log-format", e))?,
            None => parse_log_format(&f.log_format).map_err(|e| file_err("log_format", e))?,
        };
        let metrics_listen = match &cli.metrics_listen {
            Some(m) => Some(
                m.parse()
                    .map_err(|e| flag_err("--metrics-listen", format!("{e}: {m:?}")))?,
            ),
            None => match &f.metrics_listen {
                Some(m) if !m.is_empty() => Some(
                    m.parse()
                        .map_err(|e| file_err("metrics_listen", format!("{e}: {m:?}")))?,
                ),
                _ => None,
            },
        };
        let mut users = tenant::users(&f.auth.users, "auth.users", &file_err)?;
        for u in &cli.users {
            let Some((n, p)) = u.split_once(':') else {
                return Err(flag_err("--user", "expected NAME:PASSWORD".into()));
            };
            users.push((n.to_owned(), Secret(p.to_owned())));
        }
        let mut secrets = tenant::secrets(&f.auth.secrets, "auth.secrets", &file_err)?;
        secrets.extend(
            cli.auth_secrets
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .map(Secret),
        );
        let generated_secret = users.is_empty() && secrets.is_empty() && f.tenant.is_empty();
        if generated_secret {
            let mut s = [0u8; 24];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut s);
            secrets.push(Secret(s.iter().map(|b| format!("{b:02x}")).collect()));
        }
        let mut allow_peer =
            parse_all(&f.peer.allow, parse_net).map_err(|e| file_err("peer.allow", e))?;
        allow_peer.extend(
            parse_all(&cli.allow_peer, parse_net).map_err(|e| flag_err("--allow-peer", e))?,
        );
        let mut deny_peer =
            parse_all(&f.peer.deny, parse_net).map_err(|e| file_err("peer.deny", e))?;
        deny_peer
            .extend(parse_all(&cli.deny_peer, parse_net).map_err(|e| flag_err("--deny-peer", e))?);
        let nonzero32 = |v: u32| (v != 0).then_some(v);
        let nonzero64 = |v: u64| (v != 0).then_some(v);
        let quotas = crate::proto::quota::Quotas {
            total_allocations: cli
                .total_quota
                .or(nonzero32(f.quota.total_allocations))
                .and_then(nonzero32),
            user_allocations: cli
                .user_quota
                .or(nonzero32(f.quota.user_allocations))
                .and_then(nonzero32),
            allocation_bandwidth: cli
                .max_bps
                .or(nonzero64(f.quota.allocation_bytes_per_sec))
                .and_then(nonzero64),
            user_bandwidth: nonzero64(f.quota.user_bytes_per_sec),
            tenant_bandwidth: None,
        };
        if generated_secret && !f.auth.api_keys.is_empty() {
            return Err(file_err(
                "auth.api_keys",
                "the credential service mints with auth.secrets: add one (a generated secret would change at every start, and other relays would not know it)".into(),
            ));
        }
        let realm = cli.realm.clone().unwrap_or(f.realm);
        let mut tenants = Vec::new();
        if !users.is_empty() || !secrets.is_empty() {
            let api_keys = tenant::api_keys(&f.auth.api_keys, "auth.api_keys", &file_err)?;
            let (credential_ttl, credential_max_ttl) = tenant::ttls(
                f.auth.credential_ttl_secs,
                f.auth.credential_max_ttl_secs,
                "auth.",
                &file_err,
            )?;
            tenants.push(TenantSettings {
                name: crate::proto::tenant::DEFAULT_TENANT.to_owned(),
                realm: realm.clone(),
                hostnames: Vec::new(),
                origins: Vec::new(),
                users: users.clone(),
                secrets: secrets.clone(),
                api_keys,
                revoked: f.auth.revoked.clone(),
                credential_ttl,
                credential_max_ttl,
                ice_urls: tenant::ice_urls(&f.auth.ice_urls, "auth.ice_urls", &file_err)?,
                quotas: crate::proto::quota::Quotas {
                    total_allocations: None,
                    ..quotas.clone()
                },
                allow_peer: Vec::new(),
                deny_peer: Vec::new(),
                relay_only: false,
                max_lifetime: None,
            });
        } else if !f.auth.api_keys.is_empty() || !f.auth.revoked.is_empty() {
            return Err(file_err(
                "auth",
                "api_keys and revoked apply to the top-level realm's users and secrets, and none are configured".into(),
            ));
        }
        tenants.extend(tenant::resolve(&f.tenant, &realm, &quotas, &file_err)?);
        // One secret in two tenants would let the first tenant's search claim the other's
        // credentials in the default realm.
        for (i, t) in tenants.iter().enumerate() {
            let shared = t
                .secrets
                .iter()
                .any(|s| tenants[..i].iter().any(|o| o.secrets.contains(s)));
            if shared {
                let key = match f.tenant.iter().position(|c| c.name == t.name) {
                    Some(n) => format!("tenant[{n}].secrets"),
                    None => "auth.secrets".to_owned(),
                };
                return Err(file_err(
                    &key,
                    "a secret of another tenant: each tenant needs its own".into(),
                ));
            }
        }
        let test_page = if f.test_page.enabled {
            let (page, t) = tenant::test_page(&f.test_page, &realm, &file_err)?;
            tenants.push(t);
            Some(page)
        } else {
            None
        };
        let mut warnings = Vec::new();
        let tls = listen.iter().any(|l| l.transport == Transport::Tls);
        if !tls && tenants.iter().any(|t| !t.api_keys.is_empty()) {
            warnings.push(
                "api_keys are set but no tls:// listener serves the credential service (HTTPS only)"
                    .to_owned(),
            );
        }
        if let Some(page) = &test_page {
            if !tls {
                warnings.push(
                    "test_page is enabled but no tls:// listener serves it (the page is served over HTTPS only)"
                        .to_owned(),
                );
            }
            let cap = f.test_page.bytes_per_sec as f64 * 8.0 / 1e6;
            if f.test_page.bytes_per_sec != 0 && page.min_mbps > cap {
                warnings.push(format!(
                    "test_page.min_mbps {} is above the {cap} Mbit/s that test_page.bytes_per_sec lets the page measure: every path will get a warning",
                    page.min_mbps
                ));
            }
        }
        if let Some(path) = &f.auth.revoked_file {
            let (entries, bad) = read_revocations(path, &tenants);
            warnings.extend(bad);
            for (tenant, user) in entries {
                for t in tenants
                    .iter_mut()
                    .filter(|x| tenant.as_ref().is_none_or(|n| *n == x.name))
                {
                    t.revoked.push(user.clone());
                }
            }
        }
        let max_lifetime = cli.max_lifetime.unwrap_or(f.allocation.max_lifetime_secs);
        if f.allocation.default_lifetime_secs == 0 {
            return Err(file_err(
                "allocation.default_lifetime_secs",
                "must be above 0".into(),
            ));
        }
        if max_lifetime < f.allocation.default_lifetime_secs {
            return Err(file_err(
                "allocation.max_lifetime_secs",
                format!(
                    "{max_lifetime} is below default_lifetime_secs {}",
                    f.allocation.default_lifetime_secs
                ),
            ));
        }
        let replies = f.auth.unauthenticated_replies_per_sec;
        if !(replies.is_finite() && replies >= 1.0) {
            return Err(file_err(
                "auth.unauthenticated_replies_per_sec",
                format!("{replies}: at least 1 (clients need their 401 to authenticate)"),
            ));
        }
        if f.auth.nonce_lifetime_secs < 30 {
            return Err(file_err(
                "auth.nonce_lifetime_secs",
                "below 30 s, clients would loop on 438 Stale Nonce".into(),
            ));
        }
        if f.allocation.max_permissions == 0 {
            return Err(file_err(
                "allocation.max_permissions",
                "must be above 0".into(),
            ));
        }
        let echo = resolve_echo(&f.echo, cli, &file_err, &flag_err)?;
        Ok(Settings {
            realm,
            listen,
            tls_cert,
            tls_key,
            https_upstream,
            web_hostnames: f.https.web_hostnames,
            https_metrics: f.https.metrics,
            max_connections_per_ip: f.tcp.max_connections_per_ip,
            tcp_idle_timeout_secs: f.tcp.idle_timeout_secs,
            tcp_handshake_timeout_secs: f.tcp.handshake_timeout_secs,
            max_unallocated_connections: f.tcp.max_unallocated_connections,
            echo,
            relay_ips,
            external_ips,
            relay_ports,
            threads: cli.threads.unwrap_or(f.threads),
            software: (!f.software.is_empty()).then_some(f.software),
            software_unauthenticated: f.software_unauthenticated,
            unauthenticated_replies_per_sec: f.auth.unauthenticated_replies_per_sec,
            log_format,
            metrics_listen,
            drain_grace_secs: cli.drain_grace.unwrap_or(f.drain_grace_secs),
            socket_buffer_bytes: f.socket_buffer_bytes,
            users,
            secrets,
            nonce_lifetime_secs: f.auth.nonce_lifetime_secs,
            default_lifetime: f.allocation.default_lifetime_secs,
            max_lifetime,
            max_permissions: f.allocation.max_permissions,
            max_tcp_connections: f.allocation.max_tcp_connections,
            allow_peer,
            deny_peer,
            quotas,
            generated_secret,
            tenants,
            revoked_file: f.auth.revoked_file,
            test_page,
            warnings,
            source,
        })
    }
}

/// `[echo]` and the `--echo-*` flags (which add to the file's lists).
fn resolve_echo(
    f: &EchoConfig,
    cli: &Cli,
    file_err: &dyn Fn(&str, String) -> Error,
    flag_err: &dyn Fn(&str, String) -> Error,
) -> Result<EchoSettings, Error> {
    let mut udp = Vec::new();
    let mut tcp = Vec::new();
    for (list, from_file, from_flags, key, flag) in [
        (&mut udp, &f.udp, &cli.echo_udp, "echo.udp", "--echo-udp"),
        (&mut tcp, &f.tcp, &cli.echo_tcp, "echo.tcp", "--echo-tcp"),
    ] {
        for (specs, err, name) in [(from_file, file_err, key), (from_flags, flag_err, flag)] {
            for spec in specs {
                let addrs = parse_echo_spec(spec).map_err(|e| err(name, e))?;
                for a in addrs {
                    if a.port() != 0 && list.contains(&a) {
                        return Err(err(name, format!("{spec:?}: {a} is listed twice")));
                    }
                    list.push(a);
                }
                if list.len() > MAX_ECHO_PORTS {
                    return Err(err(
                        name,
                        format!("more than {MAX_ECHO_PORTS} ports in all: {spec:?}"),
                    ));
                }
            }
        }
    }
    if f.packets_per_sec == 0 {
        return Err(file_err("echo.packets_per_sec", "must be above 0".into()));
    }
    if f.bytes_per_sec == 0 {
        return Err(file_err("echo.bytes_per_sec", "must be above 0".into()));
    }
    let long_poll_max_secs = match cli.echo_long_poll_max {
        Some(s) if s > MAX_LONG_POLL_SECS => {
            return Err(flag_err(
                "--echo-long-poll-max",
                format!("{s}: at most {MAX_LONG_POLL_SECS}"),
            ))
        }
        Some(s) => s,
        None if f.long_poll_max_secs > MAX_LONG_POLL_SECS => {
            return Err(file_err(
                "echo.long_poll_max_secs",
                format!("{}: at most {MAX_LONG_POLL_SECS}", f.long_poll_max_secs),
            ))
        }
        None => f.long_poll_max_secs,
    };
    Ok(EchoSettings {
        udp,
        tcp,
        websocket: f.websocket || cli.echo_websocket,
        long_poll_max_secs,
        packets_per_sec: f.packets_per_sec,
        bytes_per_sec: f.bytes_per_sec,
    })
}

/// An echo port or range: `IP:PORT` or `IP:MIN-MAX`, IPv6 in brackets (`[::]:5055-5058`).
/// Port 0 (ephemeral) only alone.
pub fn parse_echo_spec(s: &str) -> Result<Vec<SocketAddr>, String> {
    let bad = |why: &str| format!("{s:?}: {why} (expected IP:PORT or IP:MIN-MAX)");
    let (host, ports) = s.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.contains(':') && !s.starts_with('[') {
        return Err(bad("an IPv6 address needs brackets"));
    }
    let ip: IpAddr = host.parse().map_err(|_| bad("not an IP address"))?;
    let port = |p: &str| p.trim().parse::<u16>().map_err(|_| bad("not a port"));
    let (min, max) = match ports.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (port(a)?, port(b)?);
            if a == 0 || a > b {
                return Err(bad("a range needs 1 <= MIN <= MAX"));
            }
            (a, b)
        }
        None => {
            let p = port(ports)?;
            (p, p)
        }
    };
    if usize::from(max - min) >= MAX_ECHO_PORTS {
        return Err(bad(&format!("more than {MAX_ECHO_PORTS} ports")));
    }
    Ok((min..=max).map(|p| SocketAddr::new(ip, p)).collect())
}

fn read(p: &Path) -> Result<String, Error> {
    std::fs::read_to_string(p).map_err(|e| Error::Config {
        file: p.display().to_string(),
        key: String::new(),
        reason: format!("cannot read: {e}"),
    })
}

fn parse_all<T>(items: &[String], f: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>, String> {
    items.iter().map(|s| f(s)).collect()
}

/// `udp://IP:PORT`, `tcp://IP:PORT` or `tls://IP:PORT`, optionally `?proxy-protocol`.
pub fn parse_listen(s: &str) -> Result<Listener, String> {
    let Some((scheme, rest)) = s.split_once("://") else {
        return Err(format!(
            "{s:?}: expected udp://IP:PORT, tcp://IP:PORT or tls://IP:PORT"
        ));
    };
    let transport = match scheme {
        "udp" => Transport::Udp,
        "tcp" => Transport::Tcp,
        "tls" => Transport::Tls,
        other => {
            return Err(format!(
                "{s:?}: unsupported transport {other:?} (supported: udp, tcp, tls)"
            ))
        }
    };
    let (addr, proxy_protocol) = match rest.split_once('?') {
        None => (rest, false),
        Some((a, "proxy-protocol")) if transport != Transport::Udp => (a, true),
        Some((_, q)) => {
            return Err(format!(
                "{s:?}: unknown option {q:?} (stream listeners take ?proxy-protocol)"
            ))
        }
    };
    let addr = addr.parse().map_err(|e| format!("{s:?}: {e}"))?;
    Ok(Listener {
        transport,
        addr,
        proxy_protocol,
    })
}

fn parse_external(s: &str) -> Result<(IpAddr, Option<IpAddr>), String> {
    let (public, private) = match s.split_once('/') {
        Some((a, b)) => (a, Some(b)),
        None => (s, None),
    };
    let public = public.parse().map_err(|e| format!("{s:?}: {e}"))?;
    let private = private
        .map(|p| p.parse().map_err(|e| format!("{s:?}: {e}")))
        .transpose()?;
    Ok((public, private))
}

fn parse_ports(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{s:?}: expected MIN-MAX, 1024 <= MIN <= MAX <= 65535");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b): (u16, u16) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a < 1024 || a > b {
        return Err(bad());
    }
    Ok((a, b))
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?}: not a CIDR (e.g. 203.0.113.0/24) or an IP address"))
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(format!("{other:?}: expected text or json")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Settings, Error> {
        let f = FileConfig::from_toml("test.toml", text)?;
        Settings::resolve(f, &Cli::default(), "test.toml".into())
    }

    #[test]
    fn shipped_configs_parse() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../config");
        let mut n = 0;
        for entry in std::fs::read_dir(root).expect("config dir") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "toml") {
                let text = std::fs::read_to_string(&path).expect("read");
                load(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 2, "default and example configs");
    }

    #[test]
    fn embedded_default_is_safe() {
        let s = load(DEFAULT_TOML).expect("default parses");
        assert_eq!(
            s.listen
                .iter()
                .map(|l| (l.transport, l.addr))
                .collect::<Vec<_>>(),
            vec![(
                Transport::Udp,
                "0.0.0.0:3478".parse::<SocketAddr>().expect("a")
            )]
        );
        assert!(s.allow_peer.is_empty());
        assert!(s.generated_secret);
        assert_eq!(s.secrets.len(), 1);
        assert_eq!(s.secrets[0].0.len(), 48);
        assert_eq!(
            format!("{s:?}").matches(&s.secrets[0].0).count(),
            0,
            "secret hidden"
        );
    }

    #[test]
    fn no_configuration_type_prints_a_secret() {
        let text = r#"
realm = "example.org"
listen = ["udp://127.0.0.1:0"]
[auth]
secrets = ["fleet-secret-value"]
users = [{ name = "alice", password = "alice-password-value" }]
[[tenant]]
name = "acme"
realm = "acme.example"
secrets = ["acme-secret-value"]
users = [{ name = "bob", password = "bob-password-value" }]
"#;
        let file = FileConfig::from_toml("test.toml", text).expect("parses");
        let settings = load(text).expect("resolves");
        let printed = format!("{file:?}\n{settings:?}\n{:?}", settings.tenants);
        for secret in [
            "fleet-secret-value",
            "alice-password-value",
            "acme-secret-value",
            "bob-password-value",
        ] {
            assert!(!printed.contains(secret), "{secret} printed:\n{printed}");
        }
        assert!(
            printed.contains("alice") && printed.contains("acme"),
            "{printed}"
        );
    }

    #[test]
    fn errors_name_file_key_and_reason() {
        let e = load(
            "realm = \"x\"\nlisten = [\"udp://127.0.0.1:0\"]\n[peer]\nallow = [\"10.0.0.0/33\"]\n",
        )
        .expect_err("bad cidr")
        .to_string();
        assert!(
            e.contains("test.toml") && e.contains("peer.allow") && e.contains("10.0.0.0/33"),
            "{e}"
        );
        let e = load("listen = [\"udp://127.0.0.1:0\"]\n[quota]\ntotal = 3\n")
            .expect_err("unknown")
            .to_string();
        assert!(
            e.contains("test.toml") && e.contains("quota") && e.contains("unknown field `total`"),
            "{e}"
        );
        let e = load("listen = [\"udp://127.0.0.1:0\"]\nthreads = \"many\"\n")
            .expect_err("type")
            .to_string();
        assert!(e.contains("threads") && e.contains("line 2"), "{e}");
        let e = load("listen = [\"sctp://127.0.0.1:0\"]\n")
            .expect_err("scheme")
            .to_string();
        assert!(
            e.contains("listen") && e.contains("unsupported transport"),
            "{e}"
        );
        let e = load("listen = [\"tls://127.0.0.1:0\"]\n")
            .expect_err("no cert")
            .to_string();
        assert!(e.contains("tls.cert"), "{e}");
        let e = load("listen = [\"udp://127.0.0.1:0?proxy-protocol\"]\n")
            .expect_err("proxy on udp")
            .to_string();
        assert!(e.contains("proxy-protocol"), "{e}");
        let e = load("listen = [\"udp://127.0.0.1:0\"]\nrelay_ports = \"70000-2\"\n")
            .expect_err("ports")
            .to_string();
        assert!(e.contains("relay_ports"), "{e}");
    }

    #[test]
    fn echo_is_off_by_default_and_takes_ports_and_ranges() {
        let s = load("listen = [\"udp://127.0.0.1:0\"]\n").expect("default");
        assert_eq!(s.echo.udp, vec![]);
        assert_eq!(s.echo.tcp, vec![]);
        assert!(!s.echo.http());
        assert_eq!(
            (s.echo.packets_per_sec, s.echo.bytes_per_sec),
            (100, 1_000_000)
        );
        let s = load(
            "listen = [\"udp://127.0.0.1:0\"]\n[echo]\nudp = [\"0.0.0.0:5055-5058\", \"[::]:7\"]\n\
             tcp = [\"127.0.0.1:0\", \"127.0.0.1:0\"]\nwebsocket = true\nlong_poll_max_secs = 120\n\
             packets_per_sec = 10\nbytes_per_sec = 5000\n",
        )
        .expect("echo");
        let a = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert_eq!(
            s.echo.udp,
            vec![
                a("0.0.0.0:5055"),
                a("0.0.0.0:5056"),
                a("0.0.0.0:5057"),
                a("0.0.0.0:5058"),
                a("[::]:7")
            ]
        );
        assert_eq!(s.echo.tcp, vec![a("127.0.0.1:0"), a("127.0.0.1:0")]);
        assert!(s.echo.websocket && s.echo.http());
        assert_eq!(s.echo.long_poll_max_secs, 120);
        assert_eq!((s.echo.packets_per_sec, s.echo.bytes_per_sec), (10, 5000));

        let f = FileConfig::from_toml(
            "t",
            "listen = [\"udp://127.0.0.1:0\"]\n[echo]\nudp = [\"127.0.0.1:5055\"]\n",
        )
        .expect("parse");
        let cli = Cli::parse_from([
            "turnpike",
            "--echo-udp",
            "127.0.0.1:6000-6001",
            "--echo-tcp",
            "[::1]:0",
            "--echo-websocket",
            "--echo-long-poll-max",
            "30",
        ]);
        let s = Settings::resolve(f, &cli, "t".into()).expect("flags");
        assert_eq!(
            s.echo.udp,
            vec![
                a("127.0.0.1:5055"),
                a("127.0.0.1:6000"),
                a("127.0.0.1:6001")
            ]
        );
        assert_eq!(s.echo.tcp, vec![a("[::1]:0")]);
        assert!(s.echo.websocket);
        assert_eq!(s.echo.long_poll_max_secs, 30);
    }

    #[test]
    fn bad_echo_values_name_the_key() {
        let base = "listen = [\"udp://127.0.0.1:0\"]\n[echo]\n";
        for (body, key, reason) in [
            ("udp = [\"127.0.0.1\"]", "echo.udp", "no port"),
            ("udp = [\"127.0.0.1:70000\"]", "echo.udp", "not a port"),
            ("udp = [\"localhost:7\"]", "echo.udp", "not an IP address"),
            ("udp = [\"::1:7\"]", "echo.udp", "brackets"),
            ("tcp = [\"127.0.0.1:5058-5055\"]", "echo.tcp", "MIN <= MAX"),
            ("tcp = [\"127.0.0.1:0-3\"]", "echo.tcp", "MIN <= MAX"),
            (
                "tcp = [\"127.0.0.1:1-65535\"]",
                "echo.tcp",
                "more than 1024 ports",
            ),
            (
                "udp = [\"127.0.0.1:5055-5058\", \"127.0.0.1:5058\"]",
                "echo.udp",
                "listed twice",
            ),
            ("packets_per_sec = 0", "echo.packets_per_sec", "above 0"),
            ("bytes_per_sec = 0", "echo.bytes_per_sec", "above 0"),
            (
                "long_poll_max_secs = 86400",
                "echo.long_poll_max_secs",
                "at most 3600",
            ),
            ("udp_ports = []", "echo", "unknown field `udp_ports`"),
            ("websocket = \"yes\"", "echo.websocket", "invalid type"),
        ] {
            let e = load(&format!("{base}{body}\n"))
                .expect_err(body)
                .to_string();
            assert!(
                e.contains("test.toml") && e.contains(key) && e.contains(reason),
                "{body}: {e}"
            );
        }
        let e = Settings::resolve(
            FileConfig::from_toml("t", "").expect("parse"),
            &Cli::parse_from([
                "turnpike",
                "--listen",
                "udp://127.0.0.1:0",
                "--echo-tcp",
                "127.0.0.1:x",
            ]),
            "t".into(),
        )
        .expect_err("bad flag")
        .to_string();
        assert!(
            e.contains("command line") && e.contains("--echo-tcp"),
            "{e}"
        );
    }

    #[test]
    fn flags_override_and_extend_the_file() {
        let f = FileConfig::from_toml(
            "t",
            "listen = [\"udp://0.0.0.0:3478\"]\n[auth]\nsecrets = [\"a\"]\n",
        )
        .expect("parse");
        let cli = Cli::parse_from([
            "turnpike",
            "--listen",
            "udp://127.0.0.1:0",
            "--auth-secret",
            "b",
            "--allow-peer",
            "127.0.0.0/8",
            "--user",
            "alice:pw",
            "--user-quota",
            "3",
        ]);
        let s = Settings::resolve(f, &cli, "t".into()).expect("resolve");
        assert_eq!(
            s.listen.iter().map(|l| l.addr).collect::<Vec<_>>(),
            vec!["127.0.0.1:0".parse::<SocketAddr>().expect("a")]
        );
        assert_eq!(s.secrets, vec![Secret("a".into()), Secret("b".into())]);
        assert_eq!(s.users, vec![("alice".to_owned(), Secret("pw".into()))]);
        assert_eq!(s.quotas.user_allocations, Some(3));
        assert!(!s.generated_secret);
        let e = Settings::resolve(
            FileConfig::from_toml("t", "").expect("parse"),
            &Cli::parse_from(["turnpike", "--listen", "udp://nowhere"]),
            "t".into(),
        )
        .expect_err("bad flag")
        .to_string();
        assert!(e.contains("--listen"), "{e}");
    }
}

//! Configuration: a TOML file with every key documented (see `config/turnpike.example.toml`),
//! command-line flags for the common keys, and the embedded default used when neither names a
//! file. Errors name the file, the key and the reason.
//!
//! - [`file`]: the file's format, as serde reads it (`deny_unknown_fields`, defaults).
//! - [`cli`]: the flags.
//! - `parse`: the string values (listener URLs, addresses, networks, ranges).
//! - `resolve`: file and flags into [`Settings`], validated.
//! - [`tenant`]: `[[tenant]]` tables, the test page's tenant, revocation files.
//! - [`check`]: what `--check-config` prints: the effective configuration as TOML.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

use crate::Error;

pub mod check;
pub mod cli;
pub mod file;
pub mod fleet;
mod parse;
mod resolve;
mod tenant;

pub use cli::{Cli, Command};
pub use file::{FileConfig, RegionConfig, TenantConfig};
pub use parse::{parse_echo_spec, parse_listen};
pub use tenant::{read_revocations, ApiKeyHash, TenantSettings};

/// The embedded default: UDP 3478 on every interface, peer policy on, and (since it names no
/// credentials) a random shared secret generated at start.
pub const DEFAULT_TOML: &str = include_str!("../../../config/default.toml");

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
    /// A stream connection that never held an allocation closes this long after its accept.
    pub tcp_unallocated_lifetime_secs: u64,
    pub echo: EchoSettings,
    pub relay_ips: Vec<IpAddr>,
    /// (advertised, bound) pairs.
    pub external_ips: Vec<(IpAddr, Option<IpAddr>)>,
    pub relay_ports: (u16, u16),
    /// UDP relay sockets each shard shares among its allocations, per relay address; 0: a
    /// port per allocation.
    pub shared_relay_ports: u16,
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
    /// What nonces are keyed by (`auth.nonce_secret`); None: from the first shared secret.
    pub nonce_secret: Option<Secret>,
    pub default_lifetime: u32,
    pub max_lifetime: u32,
    pub max_permissions: usize,
    /// Shared relay ports: most peer endpoints one allocation may hold.
    pub max_peer_endpoints: usize,
    pub max_tcp_connections: usize,
    pub allow_peer: Vec<IpNet>,
    pub deny_peer: Vec<IpNet>,
    pub quotas: turnpike_proto::quota::Quotas,
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
    /// Where `listen` came from, for errors about one listener: the file and `listen`, or
    /// "command line" and `--listen`.
    pub listen_origin: (String, &'static str),
    /// The same for `metrics_listen`.
    pub metrics_origin: (String, &'static str),
    /// `[store]`, `[admin]`, `[sessions]`, `[redirect]`.
    pub fleet: fleet::FleetSettings,
}

impl Settings {
    /// The file and key of listener `i`, as errors name them: `listen[1]`.
    pub fn listener_key(&self, i: usize) -> (String, String) {
        (
            self.listen_origin.0.clone(),
            format!("{}[{i}]", self.listen_origin.1),
        )
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
}

fn read(p: &Path) -> Result<String, Error> {
    std::fs::read_to_string(p).map_err(|e| Error::Config {
        file: p.display().to_string(),
        key: String::new(),
        reason: format!("cannot read: {e}"),
    })
}

#[cfg(test)]
mod tests;

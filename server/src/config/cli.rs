//! The command-line flags. Flags override the file; repeatable flags add to the file's lists.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::Parser;

/// Command-line flags. Flags override the file; repeatable flags add to the file's lists.
/// No `Debug`: it would print `--user` passwords and `--auth-secret` values.
#[derive(Parser, Default)]
#[command(name = "turnpike", version, about = "TURN/STUN relay", long_about = None, disable_help_subcommand = true)]
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
    /// What nonces are keyed by; the same on every relay of a fleet (a client redirected to
    /// a sibling keeps its nonce). Default: derived from the first shared secret.
    #[arg(
        long = "nonce-secret",
        env = "TURNPIKE_NONCE_SECRET",
        hide_env_values = true
    )]
    pub nonce_secret: Option<String>,
    /// Address relay sockets bind to (repeatable: one IPv4, one IPv6).
    #[arg(long = "relay-ip", value_name = "IP")]
    pub relay_ips: Vec<IpAddr>,
    /// Address advertised to clients, `PUBLIC` or `PUBLIC/PRIVATE` as coturn takes it (repeatable).
    #[arg(long = "external-ip", value_name = "IP[/IP]")]
    pub external_ips: Vec<String>,
    /// Relay port range `MIN-MAX`.
    #[arg(long = "relay-ports", value_name = "MIN-MAX")]
    pub relay_ports: Option<String>,
    /// Shared relay ports per thread and relay address; 0: a port per allocation.
    #[arg(long = "shared-relay-ports", value_name = "N")]
    pub shared_relay_ports: Option<u16>,
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
    /// Most allocations per user (coturn: user-quota); 0: unlimited. By default unlimited,
    /// or 1000 with shared relay ports.
    #[arg(long = "user-quota", value_name = "N")]
    pub user_quota: Option<u32>,
    /// Most allocations on this relay (coturn: total-quota); 0: unlimited. By default
    /// unlimited, or 100000 with shared relay ports.
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
    /// The tenant store, `sqlite:PATH` or `postgres://...` (overrides `store.url`).
    #[arg(
        long = "store",
        value_name = "URL",
        env = "TURNPIKE_STORE_URL",
        hide_env_values = true
    )]
    pub store: Option<String>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What `turnpike` does besides relaying.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Tenants, users, live allocations and usage of a running relay, through its admin API
    /// (`turnpike admin --help`).
    #[command(disable_help_flag = true)]
    Admin {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<String>,
    },
}

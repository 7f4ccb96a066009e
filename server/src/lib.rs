//! Turnpike: a TURN/STUN relay.
//!
//! The protocol itself is `turnpike_proto` (sans IO) and batched UDP is `turnpike_udp`; this
//! crate is the relay around them:
//!
//! - [`config`]: the TOML configuration, the flags, `--check-config`.
//! - [`io`]: the tokio layer: shards, relay sockets, RFC 6062, the TCP/TLS listeners.
//! - [`admission`]: who may open one more stream connection.
//! - [`http`]: the built-in HTTP endpoints' server, within time limits.
//! - [`metrics`]: Prometheus metrics and the health endpoints.
//! - [`service`]: the credential service; [`testpage`]: the browser network test.
//! - [`store`]: tenants, users and usage in SQLite or PostgreSQL, shared by a fleet;
//!   [`admin`]: the admin API over it and the live allocations.
//! - [`echo`]: the echo services (UDP, TCP, WebSocket, long-poll), off unless configured.
//! - [`app`]: start-up, reload, signals and draining.

pub mod admin;
pub mod admin_cli;
pub mod admission;
pub mod app;
pub mod config;
pub mod echo;
mod error;
pub mod fleet;
pub mod http;
pub mod io;
pub mod metrics;
pub mod service;
pub mod store;
pub mod testpage;
pub mod tls_seen;

pub use error::Error;

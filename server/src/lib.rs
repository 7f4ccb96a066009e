//! Turnpike: a TURN/STUN relay.
//!
//! - [`config`]: the TOML configuration and command-line flags.
//! - [`io`]: the tokio layer: UDP listeners sharded over the cores, relay sockets, timers.
//! - [`metrics`]: Prometheus metrics and the health endpoints.
//! - [`echo`]: the echo services (UDP, TCP, WebSocket, long-poll), off unless configured.
//! - [`app`]: start-up, signals and draining.

pub mod app;
pub mod config;
pub mod echo;
mod error;
pub mod io;
pub mod metrics;
pub mod service;
pub mod testpage;

pub use error::Error;

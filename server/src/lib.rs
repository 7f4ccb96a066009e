//! Turnpike: a TURN/STUN relay.
//!
//! - [`proto`]: the sans-IO core (STUN codec, credentials, peer policy, quotas, allocations).
//! - [`config`]: the TOML configuration and command-line flags.
//! - [`io`]: the tokio layer: UDP listeners sharded over the cores, relay sockets, timers.
//! - [`metrics`]: Prometheus metrics and the health endpoints.

pub mod proto;

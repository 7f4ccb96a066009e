//! The sans-IO protocol core of the Turnpike TURN relay: the STUN codec ([`stun`]), long-term
//! and ephemeral credentials with stateless nonces ([`auth`]), the peer policy ([`policy`]),
//! per-source rate limits ([`limiter`]), quotas ([`quota`]), tenants ([`tenant`]), the relay
//! port registry ([`ports`]) and the TURN state machine of one shard ([`core`]).
//!
//! # The contract
//!
//! Nothing here touches a socket, a thread, a clock or a source of randomness of its own, and
//! nothing here logs. The caller passes every input in and carries out what comes back:
//!
//! - **Time** comes in twice: an [`Instant`](std::time::Instant) (`now`) for lifetimes,
//!   timers and rates, and the wall clock in Unix seconds (`unix`) for what other machines
//!   judge by the wall clock: ephemeral credential expiry and nonce age. Pass both as read at
//!   the call; neither is derived from the other, since the wall clock may step.
//! - **Randomness** comes in as a seed ([`core::Core::new`]); the same seed and the same
//!   inputs give the same outputs, so the core runs on virtual time in tests and under a
//!   fuzzer.
//! - **Packets** come in as byte slices with their addresses; what the core wants sent is
//!   written into buffers the caller owns and described by the value it returns.
//!
//! When to call what, on a [`core::Core`]:
//!
//! - [`handle_client`](core::Core::handle_client) for each datagram (or stream frame) a client
//!   sends, and [`handle_peer`](core::Core::handle_peer) for each datagram a peer sends to a
//!   relayed address; each returns what to send, at once.
//!   An Allocate comes back as [`ClientAction::Allocate`]: bind the relay sockets it names
//!   (on ports the core drew from [`ports`]), then call
//!   [`relay_bound`](core::Core::relay_bound) for the answer.
//! - [`poll_event`](core::Core::poll_event) after each of those calls until it returns `None`:
//!   sockets to close.
//! - [`poll_timeout`](core::Core::poll_timeout) after handling input, to learn when
//!   [`handle_timeout`](core::Core::handle_timeout) is next due; call it then (calling it
//!   earlier is harmless).
//! - [`take_stats`](core::Core::take_stats) whenever the caller exports counters.
//!
//! [`core::Shared`] holds what every shard of one relay shares (configuration, quotas,
//! nonces, relay ports); it is touched when allocations are made or freed and on reload,
//! never per relayed packet.
//!
//! [`advice`] is the one table of words the probe and the relay's test page use to say what a
//! network test found.

pub mod advice;
pub mod auth;
pub mod core;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz;
pub mod limiter;
pub mod policy;
pub mod ports;
pub mod quota;
pub mod stun;
pub mod tenant;

pub use crate::core::{
    AllocId, BindFailure, BindOutcome, ClientAction, ClientId, Core, CoreConfig, CoreStats, Event,
    PeerAction, RelayAddress, RelayAddrs, RelayBind, Shared, SharedPortId, TcpQuota, TenantStats,
    STREAM_BASE,
};

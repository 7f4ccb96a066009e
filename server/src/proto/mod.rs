//! The sans-IO protocol core: codec, authentication, peer policy, quotas and the TURN state
//! machine. Nothing here touches a socket, a clock or a random source of its own: time and
//! randomness are passed in, so the core is deterministic, testable on virtual time and fuzzable.

pub mod auth;
pub mod fuzz;
pub mod limiter;
pub mod policy;
pub mod ports;
pub mod quota;
pub mod server;
pub mod stun;
pub mod tenant;

pub use server::{
    AllocId, ClientAction, ClientId, Core, CoreConfig, CoreStats, Event, PeerAction,
    PendingAllocate, RelayAddrs, Shared, TcpQuota, TenantStats, STREAM_BASE,
};

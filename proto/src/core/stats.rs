//! The counters a core keeps, per tenant, which the IO layer copies into metrics: requests by
//! method and result, authentication failures, relayed packets and bytes, drops.

use crate::auth::AuthError;
use crate::stun::method;

/// Counters of one tenant, which the IO layer copies into metrics with a `tenant` label.
/// Plain integers: one shard, no atomics.
#[derive(Debug, Default, Clone)]
pub struct TenantStats {
    /// Indexed by [`method_index`] and [`result_index`].
    pub requests: [[u64; RESULTS.len()]; METHODS.len()],
    /// Indexed like [`AuthError::ALL`].
    pub auth_failures: [u64; AuthError::ALL.len()],
    pub peer_denied: u64,
    pub allocations_created: u64,
    /// [client→peer, peer→client]
    pub relayed_packets: [u64; 2],
    pub relayed_bytes: [u64; 2],
    pub quota_dropped: u64,
}

/// Counters the IO layer copies into metrics.
#[derive(Debug, Default, Clone)]
pub struct CoreStats {
    /// By tenant id (see [`Shared::tenant_names`]); index 0 counts what no tenant claims.
    pub tenants: Vec<TenantStats>,
    pub dropped_packets: u64,
    pub malformed: u64,
    /// Unauthenticated requests left unanswered by the per-source reply limit.
    pub replies_limited: u64,
    /// Peer datagrams too large to be sent to the client in a Data indication.
    pub oversized: u64,
    /// Shared relay ports: CreatePermissions and ChannelBinds refused (403), and Send
    /// indications and ChannelData dropped, because another allocation on the same port
    /// holds the peer endpoint.
    pub shared_port_conflicts: u64,
    /// Shared relay ports: peer datagrams from an endpoint no allocation on the port holds.
    pub shared_port_unmatched: u64,
    /// Shared relay ports: requests refused (508) and Send indications and ChannelData
    /// dropped because the allocation holds its most peer endpoints already.
    pub shared_port_endpoint_limit: u64,
    /// Shared relay ports: allocations given a dedicated port because no shared port could
    /// serve their tenant.
    pub shared_port_fallbacks: u64,
}

impl CoreStats {
    /// The counters of tenant `id`.
    #[inline]
    pub fn tenant(&mut self, id: u32) -> &mut TenantStats {
        let i = id as usize;
        if i >= self.tenants.len() {
            self.tenants.resize_with(i + 1, TenantStats::default);
        }
        &mut self.tenants[i]
    }

    /// All tenants' counters added up.
    pub fn total(&self) -> TenantStats {
        let mut sum = TenantStats::default();
        for t in &self.tenants {
            for (row, trow) in sum.requests.iter_mut().zip(&t.requests) {
                for (x, y) in row.iter_mut().zip(trow) {
                    *x += y;
                }
            }
            for (x, y) in sum.auth_failures.iter_mut().zip(&t.auth_failures) {
                *x += y;
            }
            sum.peer_denied += t.peer_denied;
            sum.allocations_created += t.allocations_created;
            for d in 0..2 {
                sum.relayed_packets[d] += t.relayed_packets[d];
                sum.relayed_bytes[d] += t.relayed_bytes[d];
            }
            sum.quota_dropped += t.quota_dropped;
        }
        sum
    }
}

pub const METHODS: [&str; 6] = [
    "binding",
    "allocate",
    "refresh",
    "create_permission",
    "channel_bind",
    "other",
];
pub const RESULTS: [&str; 14] = [
    "success", "400", "401", "403", "420", "437", "438", "440", "441", "442", "443", "486", "508",
    "other",
];

pub(super) fn method_index(m: u16) -> usize {
    match m {
        method::BINDING => 0,
        method::ALLOCATE => 1,
        method::REFRESH => 2,
        method::CREATE_PERMISSION => 3,
        method::CHANNEL_BIND => 4,
        _ => 5,
    }
}

pub(super) fn result_index(code: u16) -> usize {
    match code {
        0 => 0,
        400 => 1,
        401 => 2,
        403 => 3,
        420 => 4,
        437 => 5,
        438 => 6,
        440 => 7,
        441 => 8,
        442 => 9,
        443 => 10,
        486 => 11,
        508 => 12,
        _ => 13,
    }
}

//! The TURN state machine of one shard: allocations, permissions and channels (RFC 8656), and
//! RFC 6062 TCP allocations.
//!
//! One `Core` serves the packets one shard's sockets receive; quotas, credentials, policy and
//! relay ports live in the [`Shared`] part every shard holds. The caller passes datagrams with
//! their addresses, the time and a buffer for the answer, and carries out what comes back (see
//! the crate docs for when to call what). By concern:
//!
//! - `request`: requests, from parsing to the answer, and authentication failures;
//! - `allocation`: the allocation lifecycle: Allocate (relay ports chosen here, the caller
//!   binds them), Refresh, permissions, channels, the end of an allocation;
//! - `data`: the hot path: ChannelData, Send indications, peer datagrams;
//! - `responses`: signed answers and the retransmission cache;
//! - `timers`: expiry by [`Core::poll_timeout`] and [`Core::handle_timeout`];
//! - `stats`: the counters the caller exports;
//! - `tcp`: RFC 6062 (Connect, ConnectionBind, ConnectionAttempt);
//! - `shared`: what the shards share.

mod allocation;
mod data;
mod request;
mod responses;
mod shared;
mod sharing;
mod stats;
mod tcp;
mod timers;

#[cfg(test)]
mod scenarios;

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{rngs::StdRng, SeedableRng};
use rustc_hash::FxHashMap;

use crate::limiter::{self, Limiter, Rates};
use crate::ports::PortLease;
use crate::quota::{AtomicBucket, TokenBucket, UserState};

pub use shared::{
    Alternate, CoreConfig, Redirects, RelayAddress, Shared, MAX_RESERVATIONS, RESERVATION_TTL,
};
pub use sharing::SharedPortId;
pub use stats::{CoreStats, TenantStats, METHODS, RESULTS};
pub use tcp::{StreamUsage, TcpQuota};

/// RFC 8656 §3.2 and §9: fixed permission and channel lifetimes.
pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
/// Searches by secret a source may start: a burst of 40, then 20 a second (a client needs one
/// per allocation and retransmission); beyond, 401 without the search.
const SEARCH_RATE: Rates = Rates {
    packets_per_sec: 20.0,
    bytes_per_sec: 1.0,
};

/// The client side of a 5-tuple: which of the relay's sockets (or connections) it reached and
/// from which address. RFC 8656 §2: an allocation is identified by its 5-tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientId {
    pub listener: u32,
    pub addr: SocketAddr,
}

/// Client ids at or above this are stream (TCP or TLS) connections; below, UDP listeners.
pub const STREAM_BASE: u32 = 0x8000_0000;

impl ClientId {
    pub fn is_stream(&self) -> bool {
        self.listener >= STREAM_BASE
    }
}

/// An allocation: the slot it has in its core, and the slot's generation, which changes when
/// the slot is reused, so that an event or a socket of an ended allocation can never reach the
/// next one in the same slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AllocId {
    index: u32,
    generation: u32,
}

impl AllocId {
    /// The slot, for tables the caller keeps beside the core's (one entry per slot).
    pub fn index(self) -> usize {
        self.index as usize
    }

    /// A stable text form (`SLOT.GENERATION`), for an operator to name it.
    pub fn to_text(self) -> String {
        format!("{}.{}", self.index, self.generation)
    }

    /// The inverse of [`AllocId::to_text`].
    pub fn from_text(s: &str) -> Option<AllocId> {
        let (i, g) = s.split_once('.')?;
        Some(AllocId {
            index: i.parse().ok()?,
            generation: g.parse().ok()?,
        })
    }
}

/// What the caller must do with a client datagram or stream frame.
#[derive(Debug)]
#[must_use]
pub enum ClientAction {
    /// Nothing to send (dropped, or an indication with nothing to do).
    None,
    /// Send the answer written into `out` back to the client.
    Reply,
    /// Send `packet[start..end]` from the allocation's relay socket to `peer`.
    Relay {
        alloc: AllocId,
        peer: SocketAddr,
        start: usize,
        end: usize,
    },
    /// Bind the relay sockets described, then call [`Core::relay_bound`], whose answer goes
    /// to the client.
    Allocate(RelayBind),
    /// RFC 6062 Connect: open a TCP connection from the allocation's relayed address to
    /// `peer`, then call [`Core::connect_done`].
    Connect {
        alloc: AllocId,
        peer: SocketAddr,
        connection: u32,
    },
    /// RFC 6062 ConnectionBind succeeded: send `out`, then join this client connection with
    /// the peer connection `connection`, byte for byte, charging `quota` for what passes; call
    /// [`Shared::connection_ended`] when either side closes.
    DataConnection { connection: u32, quota: TcpQuota },
}

/// The relay sockets an Allocate needs, on addresses and ports the core chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayBind {
    pub alloc: AllocId,
    /// UDP sockets to bind (or, with `tcp`, the one listening TCP socket), by family.
    pub v4: Option<SocketAddr>,
    pub v6: Option<SocketAddr>,
    /// RFC 6062: a listening TCP socket instead of UDP sockets.
    pub tcp: bool,
    /// Set DONT-FRAGMENT on the UDP sockets.
    pub dont_fragment: bool,
    /// The addresses are the shard's shared relay sockets ([`Core::add_shared_port`]):
    /// nothing to bind, report success.
    pub shared: bool,
}

/// Why the caller could not bind what a [`RelayBind`] asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindFailure {
    /// A port is in use (by another process): the core draws other ports.
    InUse,
    /// DONT-FRAGMENT cannot be set on the socket: 420 (RFC 8656 §7.2).
    DontFragment,
    /// Anything else: 508.
    Other,
}

/// What [`Core::relay_bound`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum BindOutcome {
    /// The answer to the client is in `out`: success, or the error.
    Answer,
    /// Bind these other ports instead, and report again.
    Retry(RelayBind),
}

/// What the caller must do with a datagram a peer sent to a relay socket.
#[derive(Debug, PartialEq, Eq)]
#[must_use]
pub enum PeerAction {
    Drop,
    /// A ChannelData header was written into the 4 bytes in front of the payload: send
    /// `buf[..4 + len]` to the client.
    ChannelData {
        client: ClientId,
        len: usize,
    },
    /// Send the Data indication written into `out` to the client.
    DataIndication {
        client: ClientId,
    },
}

/// Side effects the caller picks up with [`Core::poll_event`].
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// The allocation ended (expired, refreshed to 0, revoked, or its client went away):
    /// close its relay sockets.
    Freed(AllocId),
    /// An RFC 6062 peer connection was never bound, or its allocation ended: close it.
    ConnectionClosed(u32),
    /// What an ended allocation carried, for its session record (after its `Freed`).
    Ended(Box<Session>),
}

/// Why an allocation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Its lifetime ran out without a Refresh.
    Expired,
    /// The client released it (Refresh with LIFETIME 0).
    Released,
    /// Its stream connection closed.
    ClientClosed,
    /// Its user was revoked or its tenant removed.
    Revoked,
    /// An operator ended it.
    Ended,
    /// The relay stopped.
    Shutdown,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Expired => "expired",
            EndReason::Released => "released",
            EndReason::ClientClosed => "client-closed",
            EndReason::Revoked => "revoked",
            EndReason::Ended => "ended",
            EndReason::Shutdown => "shutdown",
        }
    }
}

/// What one allocation carried: up is from the client to its peers, down from the peers to
/// the client (payload bytes, as relayed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
}

/// An ended allocation, for the session record the caller writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub tenant: u32,
    pub user_id: String,
    pub client: ClientId,
    /// TCP relaying (RFC 6062) rather than UDP.
    pub tcp: bool,
    /// A stream client that came over TLS.
    pub tls: bool,
    /// The wall clock (Unix seconds) of its Allocate.
    pub started_unix: u64,
    /// How long it lived.
    pub duration: Duration,
    pub usage: Usage,
    /// Distinct peer addresses (IPs) it was given permissions for.
    pub peers: u32,
    pub reason: EndReason,
}

/// A live allocation, as an operator lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationInfo {
    pub id: AllocId,
    pub tenant: u32,
    pub username: String,
    pub user_id: String,
    pub client: ClientId,
    pub relayed: RelayAddrs,
    pub tcp: bool,
    pub tls: bool,
    pub age: Duration,
    pub usage: Usage,
    /// The peer IPs it holds permissions for now.
    pub permissions: Vec<IpAddr>,
}

/// Relayed addresses, as advertised to the client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelayAddrs {
    pub v4: Option<SocketAddr>,
    pub v6: Option<SocketAddr>,
}

#[derive(Debug)]
struct Channel {
    number: u16,
    peer: SocketAddr,
    expires: Instant,
}

#[derive(Debug)]
struct Allocation {
    client: ClientId,
    /// The tenant's stable id.
    tenant: u32,
    username: String,
    user_id: String,
    user: Arc<UserState>,
    relayed: RelayAddrs,
    expires: Instant,
    permissions: Vec<(IpAddr, Instant)>,
    channels: Vec<Channel>,
    bucket: Option<TokenBucket>,
    tcp: bool,
    /// RFC 6062: the allocation's bandwidth, shared by its data connections, which may run on
    /// other shards.
    tcp_bucket: Option<Arc<AtomicBucket>>,
    /// RFC 6062: what its data connections carried (they may run on other shards); added
    /// to `usage` wherever the allocation's counts are read.
    tcp_usage: Arc<tcp::StreamUsage>,
    /// For a relay-only tenant: the hash of the username, which its peers must share.
    session: Option<u64>,
    /// The relay ports, given back when the allocation ends.
    leases: Vec<PortLease>,
    /// Until its sockets are bound: the Allocate to answer.
    binding: Option<Box<allocation::Binding>>,
    /// The shared relay ports it relays through, by family (IPv4, IPv6); none with
    /// dedicated ports.
    shared: [Option<SharedPortId>; 2],
    /// Peer endpoints it holds on its shared ports (see `sharing`); an entry lives while
    /// the permission for its IP does.
    endpoints: Vec<SocketAddr>,
    /// What it relayed, each way.
    usage: Usage,
    /// Distinct peer IPs it was ever permitted (bounded by `max_permissions` per lifetime
    /// of each, counted once when first installed).
    peers: u32,
    started: Instant,
    started_unix: u64,
}

impl Allocation {
    /// What it relayed, each way: its datagrams and its RFC 6062 data connections' bytes.
    fn total_usage(&self) -> Usage {
        let tcp = self.tcp_usage.usage();
        Usage {
            packets: [
                self.usage.packets[0] + tcp.packets[0],
                self.usage.packets[1] + tcp.packets[1],
            ],
            bytes: [
                self.usage.bytes[0] + tcp.bytes[0],
                self.usage.bytes[1] + tcp.bytes[1],
            ],
        }
    }

    fn has_permission(&self, ip: IpAddr, now: Instant) -> bool {
        self.permissions
            .iter()
            .any(|(p, exp)| *p == ip && *exp > now)
    }

    /// The shared port that traffic with `peer` goes through, if the allocation has one.
    #[inline]
    fn shared_port(&self, peer: SocketAddr) -> Option<SharedPortId> {
        self.shared[usize::from(peer.is_ipv6())]
    }

    fn family_ok(&self, peer: SocketAddr) -> bool {
        match peer {
            SocketAddr::V4(_) => self.relayed.v4.is_some(),
            SocketAddr::V6(_) => self.relayed.v6.is_some(),
        }
    }
}

/// A slot of the allocation table.
#[derive(Debug, Default)]
struct Slot {
    generation: u32,
    allocation: Option<Allocation>,
}

/// One shard's TURN state.
pub struct Core {
    shared: Arc<Shared>,
    rng: StdRng,
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    /// Active allocations by client (not those still binding their sockets).
    by_client: FxHashMap<ClientId, AllocId>,
    responses: responses::Cache,
    timers: timers::Timers,
    events: VecDeque<Event>,
    stats: CoreStats,
    /// Which shard this core is, so RFC 6062 connection ids shared by all shards name
    /// their owner.
    shard: u32,
    /// TLS SNI host names of stream clients that sent one.
    hosts: FxHashMap<ClientId, Box<str>>,
    /// Searches for a credential's tenant by secret (an HMAC per tenant), per source.
    searches: Limiter,
    /// The configuration generation last checked for revocations.
    generation: u64,
    /// Shared relay ports, when the IO layer added some.
    sharing: sharing::Sharing,
    /// Stream clients that came over TLS (a redirect names the sibling's TLS port).
    tls: rustc_hash::FxHashSet<ClientId>,
    /// The clock of the last request or timeout, for the age of what ends outside either.
    last_now: Option<Instant>,
}

impl Core {
    /// A core seeded with `seed`: the same seed and inputs give the same outputs.
    pub fn new(shared: Arc<Shared>, seed: [u8; 32]) -> Self {
        let generation = shared.generation();
        Core {
            shared,
            rng: StdRng::from_seed(seed),
            slots: Vec::new(),
            free_slots: Vec::new(),
            by_client: FxHashMap::default(),
            responses: responses::Cache::default(),
            timers: timers::Timers::default(),
            events: VecDeque::new(),
            stats: CoreStats::default(),
            shard: 0,
            hosts: FxHashMap::default(),
            searches: Limiter::new(SEARCH_RATE, limiter::MAX_SOURCES),
            generation,
            sharing: sharing::Sharing::default(),
            tls: Default::default(),
            last_now: None,
        }
    }

    /// Tells a core which shard it is (0 by default).
    pub fn with_shard(mut self, shard: u32) -> Self {
        self.shard = shard;
        self
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Active allocations.
    pub fn allocation_count(&self) -> usize {
        self.by_client.len()
    }

    /// Takes the counters gathered since the last call. Keeps the per-tenant vector's
    /// capacity, so the packet path does not grow it anew after each call.
    pub fn take_stats(&mut self) -> CoreStats {
        let out = self.stats.clone();
        self.stats
            .tenants
            .iter_mut()
            .for_each(|t| *t = TenantStats::default());
        self.stats.dropped_packets = 0;
        self.stats.malformed = 0;
        self.stats.replies_limited = 0;
        self.stats.oversized = 0;
        self.stats.shared_port_conflicts = 0;
        self.stats.shared_port_unmatched = 0;
        self.stats.shared_port_endpoint_limit = 0;
        self.stats.shared_port_fallbacks = 0;
        out
    }

    /// Call after each `handle_*` call until it returns None.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The relayed addresses of an allocation, for tests and logs.
    pub fn relayed(&self, alloc: AllocId) -> Option<RelayAddrs> {
        self.slot(alloc).map(|a| a.relayed)
    }

    fn slot(&self, id: AllocId) -> Option<&Allocation> {
        self.slots
            .get(id.index as usize)
            .filter(|s| s.generation == id.generation)?
            .allocation
            .as_ref()
    }

    #[inline]
    fn slot_mut(&mut self, id: AllocId) -> Option<&mut Allocation> {
        live_mut(&mut self.slots, id)
    }

    /// Records the TLS SNI host name a stream client sent, which selects its tenant.
    pub fn set_client_host(&mut self, client: ClientId, host: &str) {
        self.hosts.insert(client, host.into());
    }

    /// Records that a stream client came over TLS.
    pub fn set_client_tls(&mut self, client: ClientId) {
        self.tls.insert(client);
    }

    /// A stream client's connection closed: its allocation ends with it (RFC 8656 §2.1).
    pub fn close_client(&mut self, client: ClientId) {
        self.hosts.remove(&client);
        if let Some(id) = self.by_client.get(&client).copied() {
            self.free_for(id, EndReason::ClientClosed);
        }
        self.tls.remove(&client);
    }

    /// The live allocations, for an operator's list; `now` gives their age.
    pub fn allocations(&self, now: Instant) -> Vec<AllocationInfo> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let a = s.allocation.as_ref().filter(|a| a.binding.is_none())?;
                Some(AllocationInfo {
                    id: AllocId {
                        index: i as u32,
                        generation: s.generation,
                    },
                    tenant: a.tenant,
                    username: a.username.clone(),
                    user_id: a.user_id.clone(),
                    client: a.client,
                    relayed: a.relayed,
                    tcp: a.tcp,
                    tls: self.tls.contains(&a.client),
                    age: now.saturating_duration_since(a.started),
                    usage: a.total_usage(),
                    permissions: a
                        .permissions
                        .iter()
                        .filter(|(_, exp)| *exp > now)
                        .map(|(ip, _)| *ip)
                        .collect(),
                })
            })
            .collect()
    }

    /// Ends a live allocation at an operator's request; false if it is gone.
    pub fn end(&mut self, id: AllocId) -> bool {
        if self.slot(id).is_none() {
            return false;
        }
        self.free_for(id, EndReason::Ended);
        true
    }

    pub fn has_allocation(&self, client: ClientId) -> bool {
        self.by_client.contains_key(&client)
    }

    /// Frees every allocation (shutdown after the drain grace time).
    pub fn free_all(&mut self) {
        let ids: Vec<AllocId> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.allocation.is_some())
            .map(|(i, s)| AllocId {
                index: i as u32,
                generation: s.generation,
            })
            .collect();
        for id in ids {
            self.free_for(id, EndReason::Shutdown);
        }
    }
}

/// The live allocation `id` in `slots`: borrows the table alone, so the core's other fields
/// stay usable beside it.
#[inline]
fn live_mut(slots: &mut [Slot], id: AllocId) -> Option<&mut Allocation> {
    slots
        .get_mut(id.index as usize)
        .filter(|s| s.generation == id.generation)?
        .allocation
        .as_mut()
}

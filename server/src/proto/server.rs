//! The TURN state machine of one shard: allocations, permissions and channels (RFC 8656).
//!
//! Sans-IO: the caller passes datagrams with their addresses and the current time, and carries
//! out what comes back. One `Core` serves the packets one shard's sockets receive; quotas,
//! credentials and policy live in the [`Shared`] part every shard holds.
//!
//! Relay sockets are bound by the caller: an Allocate that passes every check comes back as
//! [`ClientAction::Allocate`], and the caller answers with [`Core::complete_allocate`] or
//! [`Core::fail_allocate`].

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{rngs::StdRng, RngCore, SeedableRng};
use rustc_hash::FxHashMap;

use super::auth::{AuthError, Authenticated, Nonces, PASSWORD_ALGORITHMS};
use super::limiter::{self, Limiter, Rates};
use super::policy::normalize;
use super::ports::RelayPorts;
use super::quota::{AtomicBucket, QuotaError, QuotaState, TokenBucket, UserState};
use super::stun::{
    self, attr, channel_data_header, method, Builder, Class, Message, TransactionId,
};
use super::tenant::{Tenant, Tenants, NO_TENANT};

/// RFC 8656 §3.2 and §9: fixed permission and channel lifetimes.
pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
/// How long a retransmitted request is answered from the cache (RFC 8489: 39.5 s of retries).
const RESPONSE_CACHE_TTL: Duration = Duration::from_secs(40);
const RESPONSE_CACHE_MAX: usize = 8192;
/// Searches by secret a source may start: a burst of 40, then 20 a second (a client needs one
/// per allocation and retransmission); beyond, 401 without the search.
const SEARCH_RATE: Rates = Rates {
    packets_per_sec: 20.0,
    bytes_per_sec: 1.0,
};
/// Transport protocol number for UDP in REQUESTED-TRANSPORT.
const PROTO_UDP: u8 = 17;
const PROTO_TCP: u8 = 6;

/// Settings the core needs; the IO layer builds it from the configuration.
#[derive(Debug)]
pub struct CoreConfig {
    /// Credentials, quotas and peer policy, per tenant.
    pub tenants: Tenants,
    /// LIFETIME given when a request names none (RFC: 600 s).
    pub default_lifetime: u32,
    /// Longest LIFETIME granted.
    pub max_lifetime: u32,
    pub nonce_lifetime: u64,
    /// Most permissions (and, separately, channels) one allocation may hold.
    pub max_permissions: usize,
    /// Most peer connections (connecting, waiting for ConnectionBind, or bound) one RFC 6062
    /// TCP allocation may hold.
    pub max_tcp_connections: usize,
    /// Which relay families this relay can allocate.
    pub relay_v4: bool,
    pub relay_v6: bool,
    /// SOFTWARE attribute of signed responses; None sends none.
    pub software: Option<String>,
    /// Whether replies to unauthenticated requests (Binding, 401, 438, 400, 420) carry
    /// SOFTWARE too; off by default, so that what a stranger gets back stays small.
    pub software_unauthenticated: bool,
    /// Error replies to unauthenticated requests (401, 438, 400, 420) one UDP source (an
    /// IPv4 address or an IPv6 /64) may get per second, in bursts of twice that; beyond, the
    /// requests are dropped unanswered and counted. A spoofed source can so make the relay
    /// send at most this many small replies a second to its victim.
    pub unauthenticated_replies_per_sec: f64,
    /// The relay port range. Read once, when [`Shared`] is made: a reload does not change it.
    pub relay_ports: (u16, u16),
}

/// What every shard of one relay shares.
pub struct Shared {
    config: arc_swap::ArcSwap<CoreConfig>,
    /// RFC 6062 connection ids of every shard: a data connection's ConnectionBind may reach
    /// another shard than the one holding the allocation. Touched only by TCP-allocation
    /// requests, never per packet.
    tcp_conns: std::sync::Mutex<tcp_alloc::TcpConns>,
    pub quotas: QuotaState,
    pub nonces: Nonces,
    draining: AtomicBool,
    /// Tenant names by stable id (index); id 0 is requests no tenant claims. Only grows, by
    /// the names configured, so it bounds the `tenant` metrics label.
    tenant_names: std::sync::Mutex<Vec<String>>,
    /// Bumped by each reload; shards then check their allocations against the new
    /// configuration (revoked users, removed tenants).
    generation: AtomicU64,
    /// Relayed addresses (TCP or not, address) of relay-only tenants' allocations (the test
    /// page), with their owner (tenant, username hash): such an allocation may reach only its
    /// own session's other allocations. Touched only for those tenants.
    relayed: std::sync::Mutex<HashMap<(bool, SocketAddr), (u32, u64)>>,
    /// The relay ports in use, per relay address and transport.
    pub ports: Arc<RelayPorts>,
    /// Where the millisecond clock of the bandwidth buckets starts: one for every shard, since
    /// a user's and a tenant's buckets are shared by the shards.
    epoch: Instant,
    /// Error replies to unauthenticated UDP requests, per source, across the shards (the
    /// kernel spreads one source's ports over them). Touched only for such replies.
    replies: std::sync::Mutex<Limiter>,
}

impl Shared {
    /// `epoch`: any instant before the first packet; the bandwidth buckets count from it.
    pub fn new(
        mut config: CoreConfig,
        quotas: QuotaState,
        nonce_key: [u8; 32],
        epoch: Instant,
    ) -> Self {
        let nonces = Nonces::new(
            nonce_key,
            config.nonce_lifetime,
            config.tenants.has_static_users(),
        );
        let mut names = vec![NO_TENANT.to_owned()];
        assign_tenant_ids(&mut config.tenants, &mut names);
        let ports = RelayPorts::new(config.relay_ports);
        let replies = std::sync::Mutex::new(reply_limiter(config.unauthenticated_replies_per_sec));
        Shared {
            config: arc_swap::ArcSwap::from_pointee(config),
            tcp_conns: std::sync::Mutex::new(tcp_alloc::TcpConns::default()),
            quotas,
            nonces,
            draining: AtomicBool::new(false),
            tenant_names: std::sync::Mutex::new(names),
            generation: AtomicU64::new(0),
            relayed: Default::default(),
            ports,
            epoch,
            replies,
        }
    }

    fn replies(&self) -> std::sync::MutexGuard<'_, Limiter> {
        self.replies.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Milliseconds since the epoch, the clock of the bandwidth buckets.
    #[inline]
    pub fn millis(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    fn relayed_addrs(&self) -> std::sync::MutexGuard<'_, HashMap<(bool, SocketAddr), (u32, u64)>> {
        self.relayed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tenant names by stable id, for metrics labels.
    pub fn tenant_names(&self) -> Vec<String> {
        self.tenant_names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The current settings; `reload` replaces them between two requests.
    pub fn config(&self) -> arc_swap::Guard<Arc<CoreConfig>> {
        self.config.load()
    }

    /// Replaces credentials, policy and limits (SIGHUP); allocations keep relaying, except
    /// those of revoked users and removed tenants, which each shard ends at its next tick.
    pub fn reload(&self, mut config: CoreConfig) {
        {
            let mut names = self.tenant_names.lock().unwrap_or_else(|e| e.into_inner());
            assign_tenant_ids(&mut config.tenants, &mut names);
        }
        {
            let mut replies = self.replies();
            if replies.rates().packets_per_sec != config.unauthenticated_replies_per_sec {
                *replies = reply_limiter(config.unauthenticated_replies_per_sec);
            }
        }
        self.config.store(Arc::new(config));
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// From now on Allocate is refused with 508; existing allocations go on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// The limiter of replies to unauthenticated requests: a refused source cannot authenticate,
/// so a table full of spoofed sources is forgotten rather than locking new clients out.
fn reply_limiter(per_sec: f64) -> Limiter {
    Limiter::forgetting_when_full(
        Rates {
            packets_per_sec: per_sec,
            // Replies are counted, not their bytes: a rate no reply reaches.
            bytes_per_sec: 1e12,
        },
        limiter::MAX_SOURCES,
    )
}

/// Gives each tenant the stable id of its name, registering new names.
fn assign_tenant_ids(tenants: &mut Tenants, names: &mut Vec<String>) {
    for t in tenants.list_mut() {
        t.id = match names.iter().position(|n| *n == t.name) {
            Some(i) => i as u32,
            None => {
                names.push(t.name.clone());
                (names.len() - 1) as u32
            }
        };
    }
}

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

/// Index of an allocation; the IO layer keeps its relay sockets under the same index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllocId(pub u32);

/// What the IO layer must do with a client datagram.
#[derive(Debug)]
#[must_use]
pub enum ClientAction {
    /// Nothing to send (dropped, or an indication with nothing to do).
    None,
    /// Send `Core::output()` back to the client.
    Reply,
    /// Send `packet[range]` from the allocation's relay socket to `peer`.
    Relay {
        alloc: AllocId,
        peer: SocketAddr,
        start: usize,
        end: usize,
    },
    /// Bind relay sockets as described, then call `complete_allocate` or `fail_allocate`.
    Allocate(Box<PendingAllocate>),
    /// RFC 6062 Connect: open a TCP connection from the allocation's relayed address to
    /// `peer`, then call `connect_done`.
    Connect {
        alloc: AllocId,
        peer: SocketAddr,
        connection: u32,
    },
    /// RFC 6062 ConnectionBind succeeded: send `output()`, then join this client connection
    /// with the peer connection `connection`, byte for byte, charging `quota` for what
    /// passes; call [`Shared::connection_ended`] when either side closes.
    Bind { connection: u32, quota: TcpQuota },
}

/// What the IO layer must do with a datagram a peer sent to a relay socket.
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
    /// Send `Core::output()` (a Data indication) to the client.
    DataIndication {
        client: ClientId,
    },
}

/// Side effects the IO layer picks up with `Core::poll_event`.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// The allocation ended (expired, refreshed to 0, or revoked): close its relay sockets.
    Freed(AllocId),
    /// An RFC 6062 peer connection was never bound, or its allocation ended: close it.
    ConnectionClosed(u32),
}

/// An Allocate request that passed every check; the IO layer binds what it asks for.
#[derive(Debug)]
pub struct PendingAllocate {
    client: ClientId,
    tid: TransactionId,
    auth: Authenticated,
    user: Arc<UserState>,
    pub lifetime: u32,
    pub want_v4: bool,
    pub want_v6: bool,
    /// ADDITIONAL-ADDRESS-FAMILY asked for IPv6 that this relay lacks: answer with
    /// ADDRESS-ERROR-CODE 440 beside the IPv4 allocation.
    v6_refused: bool,
    /// EVEN-PORT: bind an even port; with `reserve_next`, also hold port+1 under `new_token`.
    pub even_port: bool,
    pub new_token: Option<[u8; 8]>,
    /// RESERVATION-TOKEN: use the port reserved under this token.
    pub use_token: Option<[u8; 8]>,
    pub dont_fragment: bool,
    /// RFC 6062: relay TCP, so bind a listening TCP socket.
    pub tcp: bool,
}

/// Relay addresses the IO layer bound for a pending allocation, as advertised to the client.
#[derive(Debug, Clone, Copy, Default)]
pub struct RelayAddrs {
    pub v4: Option<SocketAddr>,
    pub v6: Option<SocketAddr>,
}

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

fn method_index(m: u16) -> usize {
    match m {
        method::BINDING => 0,
        method::ALLOCATE => 1,
        method::REFRESH => 2,
        method::CREATE_PERMISSION => 3,
        method::CHANNEL_BIND => 4,
        _ => 5,
    }
}

fn result_index(code: u16) -> usize {
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

fn reason(code: u16) -> &'static str {
    match code {
        300 => "Try Alternate",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        420 => "Unknown Attribute",
        437 => "Allocation Mismatch",
        438 => "Stale Nonce",
        440 => "Address Family not Supported",
        441 => "Wrong Credentials",
        442 => "Unsupported Transport Protocol",
        443 => "Peer Address Family Mismatch",
        446 => "Connection Already Exists",
        447 => "Connection Timeout or Failure",
        486 => "Allocation Quota Reached",
        508 => "Insufficient Capacity",
        _ => "Server Error",
    }
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
    /// For a relay-only tenant: the hash of the username, which its peers must share.
    session: Option<u64>,
}

impl Allocation {
    fn has_permission(&self, ip: IpAddr, now: Instant) -> bool {
        self.permissions
            .iter()
            .any(|(p, exp)| *p == ip && *exp > now)
    }

    fn family_ok(&self, peer: SocketAddr) -> bool {
        match peer {
            SocketAddr::V4(_) => self.relayed.v4.is_some(),
            SocketAddr::V6(_) => self.relayed.v6.is_some(),
        }
    }
}

/// One shard's TURN state.
pub struct Core {
    shared: Arc<Shared>,
    rng: StdRng,
    slots: Vec<Option<Allocation>>,
    free_slots: Vec<u32>,
    by_client: FxHashMap<ClientId, AllocId>,
    responses: HashMap<(ClientId, TransactionId), (Instant, Vec<u8>)>,
    response_order: VecDeque<(ClientId, TransactionId)>,
    events: VecDeque<Event>,
    out: Vec<u8>,
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
}

impl Core {
    /// Tells a core which shard it is (0 by default).
    pub fn with_shard(mut self, shard: u32) -> Self {
        self.shard = shard;
        self
    }

    pub fn new(shared: Arc<Shared>, seed: [u8; 32]) -> Self {
        let shared_generation = shared.generation();
        Core {
            shared,
            rng: StdRng::from_seed(seed),
            slots: Vec::new(),
            free_slots: Vec::new(),
            by_client: FxHashMap::default(),
            responses: HashMap::new(),
            response_order: VecDeque::new(),
            events: VecDeque::new(),
            out: Vec::with_capacity(1500),
            stats: CoreStats::default(),
            shard: 0,
            hosts: FxHashMap::default(),
            searches: Limiter::new(SEARCH_RATE, limiter::MAX_SOURCES),
            generation: shared_generation,
        }
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The datagram to send after `Reply` or `DataIndication`.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    pub fn allocation_count(&self) -> usize {
        self.by_client.len()
    }

    /// Takes the counters gathered since the last call.
    /// Keeps the per-tenant vector's capacity, so the packet path does not grow it anew
    /// after each call.
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
        out
    }

    /// Call after each `handle_*` call until it returns None.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The relay addresses of an allocation, for tests and logs.
    pub fn relayed(&self, alloc: AllocId) -> Option<RelayAddrs> {
        self.slot(alloc).map(|a| a.relayed)
    }

    fn slot(&self, id: AllocId) -> Option<&Allocation> {
        self.slots.get(id.0 as usize).and_then(Option::as_ref)
    }

    /// Handles a datagram from a client. For ChannelData this is one hash lookup and a scan
    /// of the allocation's few channels, with no allocation and no copy.
    ///
    /// `now` drives timers and rates; `unix` is the wall clock in Unix seconds, which judges
    /// ephemeral credentials and nonces. Pass both as read at the call, not one derived from
    /// the other: the wall clock may step (NTP) while the relay runs.
    pub fn handle_client(
        &mut self,
        packet: &[u8],
        client: ClientId,
        now: Instant,
        unix: u64,
    ) -> ClientAction {
        if stun::is_channel_data(packet) {
            return self.client_channel_data(packet, client, now);
        }
        let Ok(msg) = Message::parse(packet) else {
            self.stats.malformed += 1;
            return ClientAction::None;
        };
        match msg.class() {
            Class::Request => self.request(&msg, client, now, unix),
            Class::Indication if msg.method() == method::SEND => {
                self.send_indication(&msg, client, now)
            }
            Class::Indication | Class::Success | Class::Error => {
                self.stats.dropped_packets += 1;
                ClientAction::None
            }
        }
    }

    #[inline]
    fn client_channel_data(
        &mut self,
        packet: &[u8],
        client: ClientId,
        now: Instant,
    ) -> ClientAction {
        let Some((number, len)) = channel_data_header(packet) else {
            self.stats.malformed += 1;
            return ClientAction::None;
        };
        let Some(&id) = self.by_client.get(&client) else {
            self.stats.dropped_packets += 1;
            return ClientAction::None;
        };
        let Some(Some(a)) = self.slots.get_mut(id.0 as usize) else {
            return ClientAction::None;
        };
        let Some(ch) = a
            .channels
            .iter()
            .find(|c| c.number == number && c.expires > now)
        else {
            self.stats.dropped_packets += 1;
            return ClientAction::None;
        };
        let peer = ch.peer;
        let counters = self.stats.tenant(a.tenant);
        if !Self::within_bandwidth(a, &self.shared, now, len) {
            counters.quota_dropped += 1;
            return ClientAction::None;
        }
        counters.relayed_packets[0] += 1;
        counters.relayed_bytes[0] += len as u64;
        ClientAction::Relay {
            alloc: id,
            peer,
            start: 4,
            end: 4 + len,
        }
    }

    #[inline]
    fn within_bandwidth(a: &mut Allocation, shared: &Shared, now: Instant, len: usize) -> bool {
        if a.bucket.is_none() && !a.user.limited() {
            return true;
        }
        let now_ms = shared.millis(now);
        if !a.bucket.as_mut().is_none_or(|b| b.allow(now_ms, len)) {
            return false;
        }
        if a.user.allow(now_ms, len) {
            return true;
        }
        // A dropped packet costs the allocation nothing.
        if let Some(b) = a.bucket.as_mut() {
            b.refund(len);
        }
        false
    }

    fn send_indication(
        &mut self,
        msg: &Message<'_>,
        client: ClientId,
        now: Instant,
    ) -> ClientAction {
        let Some(&id) = self.by_client.get(&client) else {
            self.stats.dropped_packets += 1;
            return ClientAction::None;
        };
        let (Some(peer), Some(data)) = (
            msg.get(attr::XOR_PEER_ADDRESS)
                .and_then(|v| msg.xor_address(v)),
            msg.get(attr::DATA),
        ) else {
            self.stats.malformed += 1;
            return ClientAction::None;
        };
        if msg
            .attribute_types()
            .any(|t| t < 0x8000 && !attr::is_known_required(t))
        {
            self.stats.dropped_packets += 1;
            return ClientAction::None;
        }
        let peer = SocketAddr::new(normalize(peer.ip()), peer.port());
        let Some(Some(a)) = self.slots.get_mut(id.0 as usize) else {
            return ClientAction::None;
        };
        // Permissions are per IP, so the port-level rules (own relayed address, the relay's
        // listening ports and host services) are checked on every Send indication too.
        let own = [a.relayed.v4, a.relayed.v6];
        if !a.has_permission(peer.ip(), now)
            || !a.family_ok(peer)
            || own.contains(&Some(peer))
            || !peer_allowed(&self.shared, &self.shared.config().tenants, a, peer)
        {
            self.stats.dropped_packets += 1;
            return ClientAction::None;
        }
        let counters = self.stats.tenant(a.tenant);
        if !Self::within_bandwidth(a, &self.shared, now, data.len()) {
            counters.quota_dropped += 1;
            return ClientAction::None;
        }
        let start = data.as_ptr() as usize - msg.raw().as_ptr() as usize;
        counters.relayed_packets[0] += 1;
        counters.relayed_bytes[0] += data.len() as u64;
        ClientAction::Relay {
            alloc: id,
            peer,
            start,
            end: start + data.len(),
        }
    }

    /// Handles a datagram a peer sent to allocation `alloc`. The payload sits at
    /// `buf[4..4 + len]`; the four bytes in front are room for a ChannelData header.
    #[inline]
    pub fn handle_peer(
        &mut self,
        alloc: AllocId,
        peer: SocketAddr,
        buf: &mut [u8],
        len: usize,
        now: Instant,
    ) -> PeerAction {
        let Some(Some(a)) = self.slots.get_mut(alloc.0 as usize) else {
            return PeerAction::Drop;
        };
        let peer = SocketAddr::new(normalize(peer.ip()), peer.port());
        if !a.has_permission(peer.ip(), now) {
            self.stats.dropped_packets += 1;
            return PeerAction::Drop;
        }
        let client = a.client;
        let channel = a
            .channels
            .iter()
            .find(|c| c.peer == peer && c.expires > now)
            .map(|c| c.number);
        // What the client gets must fit a STUN length field and, over UDP, one datagram: a
        // larger peer datagram is dropped, never sent with a wrapped length.
        let framed = match channel {
            Some(_) => 4 + len,
            None => stun::HEADER_LEN + xor_address_len(peer) + 4 + ((len + 3) & !3),
        };
        let fits = if client.is_stream() {
            framed - 4 <= usize::from(u16::MAX)
        } else {
            framed <= max_udp_payload(client.addr)
        };
        if !fits || buf.len() < 4 + len {
            self.stats.oversized += 1;
            return PeerAction::Drop;
        }
        let counters = self.stats.tenant(a.tenant);
        if !Self::within_bandwidth(a, &self.shared, now, len) {
            counters.quota_dropped += 1;
            return PeerAction::Drop;
        }
        counters.relayed_packets[1] += 1;
        counters.relayed_bytes[1] += len as u64;
        if let Some(number) = channel {
            buf[0..2].copy_from_slice(&number.to_be_bytes());
            buf[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            return PeerAction::ChannelData { client, len };
        }
        let mut tid = [0u8; 16];
        tid[..4].copy_from_slice(&stun::MAGIC_COOKIE.to_be_bytes());
        self.rng.fill_bytes(&mut tid[4..]);
        Builder::new(
            &mut self.out,
            Class::Indication,
            method::DATA,
            TransactionId(tid),
        )
        .xor_address(attr::XOR_PEER_ADDRESS, peer)
        .attr(attr::DATA, &buf[4..4 + len]);
        PeerAction::DataIndication { client }
    }

    /// The tenant an unsigned request is counted against: the one its ORIGIN or SNI names,
    /// else the default tenant, else none (0).
    fn unclaimed(&self, msg: &Message<'_>, client: ClientId) -> u32 {
        let host = self.hosts.get(&client).map(|h| &**h);
        self.shared
            .config()
            .tenants
            .named(msg.get_all(attr::ORIGIN), host)
            .map_or(0, |t| t.id)
    }

    fn request(
        &mut self,
        msg: &Message<'_>,
        client: ClientId,
        now: Instant,
        unix: u64,
    ) -> ClientAction {
        let m = msg.method();
        if m == method::BINDING {
            let tenant = self.unclaimed(msg, client);
            if unknown_required(msg).1 > 0 {
                self.count(tenant, m, 420);
                if !self.may_reply(client, now) {
                    return ClientAction::None;
                }
                return self.unknown_attributes(msg);
            }
            self.count(tenant, m, 0);
            return self.binding(msg, client);
        }
        if !matches!(
            m,
            method::ALLOCATE
                | method::REFRESH
                | method::CREATE_PERMISSION
                | method::CHANNEL_BIND
                | method::CONNECT
                | method::CONNECTION_BIND
        ) {
            let tenant = self.unclaimed(msg, client);
            self.count(tenant, m, 400);
            if !self.may_reply(client, now) {
                return ClientAction::None;
            }
            self.error_unsigned(msg, 400);
            return ClientAction::Reply;
        }
        let tid = msg.transaction_id();
        if let Some((_, cached)) = self.responses.get(&(client, tid)) {
            self.out.clear();
            self.out.extend_from_slice(cached);
            return ClientAction::Reply;
        }
        let config = self.shared.config();
        let host = self.hosts.get(&client).map(|h| &**h);
        let searches = &mut self.searches;
        let mut may_search = || searches.allow(client.addr.ip(), 0, now);
        let auth = match config.tenants.authenticate(
            msg,
            &self.shared.nonces,
            client.addr,
            host,
            unix,
            &mut may_search,
        ) {
            Ok(a) => a,
            Err((tenant, e)) => {
                drop(config);
                return self.auth_failure(msg, client, tenant.unwrap_or(0), e, now, unix);
            }
        };
        let revoked = config
            .tenants
            .get(auth.tenant)
            .is_some_and(|t| t.is_revoked(&auth.user_id, &auth.username));
        drop(config);
        if revoked {
            // Authenticated, so the refusal is signed and final: 403 (RFC 8656 §7.2 lists
            // it for administrative refusals).
            self.count_auth_failure(auth.tenant, AuthError::Revoked);
            return self.finish(msg, client, &auth, Err(403), now);
        }
        // Checked after authentication, so the 420 is signed and the client accepts it
        // (RFC 8489 §9.2.5).
        if unknown_required(msg).1 > 0 {
            return self.finish(msg, client, &auth, Err(420), now);
        }
        let existing = self.by_client.get(&client).copied();
        if let Some(id) = existing {
            if self
                .slot(id)
                .is_some_and(|a| a.username != auth.username || a.tenant != auth.tenant)
            {
                return self.finish(msg, client, &auth, Err(441), now);
            }
        }
        let result = match m {
            method::ALLOCATE => match self.allocate(msg, client, &auth, existing) {
                Ok(pending) => return ClientAction::Allocate(pending),
                Err(code) => Err(code),
            },
            method::CONNECT => match self.connect(msg, client, &auth, existing, now) {
                Ok(action) => return action,
                Err(code) => Err(code),
            },
            method::CONNECTION_BIND => match self.connection_bind(msg, &auth, existing) {
                Ok((connection, quota)) => {
                    let _ = self.finish(msg, client, &auth, Ok(None), now);
                    return ClientAction::Bind { connection, quota };
                }
                Err(code) => Err(code),
            },
            method::REFRESH => self.refresh(msg, existing, now).map(Some),
            method::CREATE_PERMISSION => self.create_permission(msg, existing, now).map(|()| None),
            _ => self.channel_bind(msg, existing, now).map(|()| None),
        };
        self.finish(msg, client, &auth, result, now)
    }

    fn count(&mut self, tenant: u32, m: u16, code: u16) {
        self.stats.tenant(tenant).requests[method_index(m)][result_index(code)] += 1;
    }

    fn count_auth_failure(&mut self, tenant: u32, e: AuthError) {
        if let Some(i) = AuthError::ALL.iter().position(|x| *x == e) {
            self.stats.tenant(tenant).auth_failures[i] += 1;
        }
    }

    /// Whether an unauthenticated request from `client` may be answered with an error now: at
    /// most `unauthenticated_replies_per_sec` per UDP source. Stream clients cannot spoof
    /// their address, so only UDP is limited.
    fn may_reply(&mut self, client: ClientId, now: Instant) -> bool {
        if client.is_stream() || self.shared.replies().allow(client.addr.ip(), 0, now) {
            return true;
        }
        self.stats.replies_limited += 1;
        false
    }

    /// 420 for comprehension-required attributes this server does not know (RFC 8489 §7.3.1),
    /// to an unauthenticated request.
    fn unknown_attributes(&mut self, msg: &Message<'_>) -> ClientAction {
        let (unknown, n) = unknown_required(msg);
        // The guard owns its Arc: no copy of the SOFTWARE string per request.
        let config = self.shared.config();
        let software = config
            .software
            .as_deref()
            .filter(|_| config.software_unauthenticated);
        let mut b = Builder::new(
            &mut self.out,
            Class::Error,
            msg.method(),
            msg.transaction_id(),
        );
        b.error(420, reason(420)).unknown_attributes(&unknown[..n]);
        if let Some(s) = software {
            b.attr(attr::SOFTWARE, s.as_bytes());
        }
        if !msg.transaction_id().is_classic() {
            b.fingerprint();
        }
        ClientAction::Reply
    }

    fn binding(&mut self, msg: &Message<'_>, client: ClientId) -> ClientAction {
        let tid = msg.transaction_id();
        let config = self.shared.config();
        let software = config
            .software
            .as_deref()
            .filter(|_| config.software_unauthenticated);
        let mut b = Builder::new(&mut self.out, Class::Success, method::BINDING, tid);
        if tid.is_classic() {
            // RFC 3489 §11.2.1: MAPPED-ADDRESS. SOURCE-ADDRESS and CHANGED-ADDRESS are left
            // out: this relay has no alternate address to offer, and a listener on 0.0.0.0
            // does not know which of its addresses answered.
            b.address(attr::MAPPED_ADDRESS, client.addr);
        } else {
            b.xor_address(attr::XOR_MAPPED_ADDRESS, client.addr);
            if let Some(s) = software {
                b.attr(attr::SOFTWARE, s.as_bytes());
            }
            b.fingerprint();
        }
        ClientAction::Reply
    }

    fn auth_failure(
        &mut self,
        msg: &Message<'_>,
        client: ClientId,
        tenant: u32,
        e: AuthError,
        now: Instant,
        unix: u64,
    ) -> ClientAction {
        let code = e.code();
        self.count(tenant, msg.method(), code);
        self.count_auth_failure(tenant, e);
        if !self.may_reply(client, now) {
            return ClientAction::None;
        }
        let mut nonce = [0u8; 37];
        let nonce = self.shared.nonces.issue(client.addr, unix, &mut nonce);
        let shared = &self.shared;
        let mut b = Builder::new(
            &mut self.out,
            Class::Error,
            msg.method(),
            msg.transaction_id(),
        );
        b.error(code, reason(code));
        if code != 400 {
            let config = shared.config();
            let host = self.hosts.get(&client).map(|h| &**h);
            let realm = config
                .tenants
                .challenge_realm(msg.get_all(attr::ORIGIN), host);
            b.attr(attr::REALM, realm.as_bytes())
                .attr(attr::NONCE, nonce)
                .attr(attr::PASSWORD_ALGORITHMS, &PASSWORD_ALGORITHMS);
        }
        // SOFTWARE only where the operator asks: unauthenticated answers stay small.
        let config = shared.config();
        if let Some(s) = config
            .software
            .as_deref()
            .filter(|_| config.software_unauthenticated)
        {
            b.attr(attr::SOFTWARE, s.as_bytes());
        }
        b.fingerprint();
        ClientAction::Reply
    }

    fn error_unsigned(&mut self, msg: &Message<'_>, code: u16) {
        let config = self.shared.config();
        let mut b = Builder::new(
            &mut self.out,
            Class::Error,
            msg.method(),
            msg.transaction_id(),
        );
        b.error(code, reason(code));
        if let Some(s) = config
            .software
            .as_deref()
            .filter(|_| config.software_unauthenticated)
        {
            b.attr(attr::SOFTWARE, s.as_bytes());
        }
        if !msg.transaction_id().is_classic() {
            b.fingerprint();
        }
    }

    /// Writes a signed response (success with an optional LIFETIME, or an error code),
    /// caches it for retransmissions and counts it.
    fn finish(
        &mut self,
        msg: &Message<'_>,
        client: ClientId,
        auth: &Authenticated,
        result: Result<Option<u32>, u16>,
        now: Instant,
    ) -> ClientAction {
        let code = result.err().unwrap_or(0);
        self.count(auth.tenant, msg.method(), code);
        let class = if code == 0 {
            Class::Success
        } else {
            Class::Error
        };
        let shared = Arc::clone(&self.shared);
        let mut b = Builder::new(&mut self.out, class, msg.method(), msg.transaction_id());
        match result {
            Err(420) => {
                let (unknown, n) = unknown_required(msg);
                b.error(420, reason(420)).unknown_attributes(&unknown[..n]);
            }
            Err(code) => {
                b.error(code, reason(code));
            }
            Ok(Some(lifetime)) => {
                b.u32(attr::LIFETIME, lifetime);
            }
            Ok(None) => {}
        }
        sign(&mut b, &shared, auth);
        self.cache_response(client, msg.transaction_id(), now);
        ClientAction::Reply
    }

    fn cache_response(&mut self, client: ClientId, tid: TransactionId, now: Instant) {
        while self.response_order.len() >= RESPONSE_CACHE_MAX {
            if let Some(k) = self.response_order.pop_front() {
                self.responses.remove(&k);
            }
        }
        self.responses
            .insert((client, tid), (now, self.out.clone()));
        self.response_order.push_back((client, tid));
    }

    fn allocate(
        &mut self,
        msg: &Message<'_>,
        client: ClientId,
        auth: &Authenticated,
        existing: Option<AllocId>,
    ) -> Result<Box<PendingAllocate>, u16> {
        let config = self.shared.config();
        if existing.is_some() {
            return Err(437);
        }
        if self.shared.is_draining() {
            return Err(508);
        }
        let Some(transport) = msg.get(attr::REQUESTED_TRANSPORT) else {
            return Err(400);
        };
        if transport.len() != 4 {
            return Err(400);
        }
        let tcp = match transport[0] {
            PROTO_UDP => false,
            // RFC 6062 §5.1: TCP relaying for clients that reach the relay over TCP or TLS.
            PROTO_TCP if client.is_stream() => true,
            PROTO_TCP => return Err(400),
            _ => return Err(442),
        };
        let even = msg.get(attr::EVEN_PORT);
        if tcp
            && (even.is_some()
                || msg.has(attr::RESERVATION_TOKEN)
                || msg.has(attr::DONT_FRAGMENT)
                || additional_family(msg).is_some())
        {
            return Err(400);
        }
        let token = msg.get(attr::RESERVATION_TOKEN);
        let family = msg.get(attr::REQUESTED_ADDRESS_FAMILY);
        let additional = additional_family(msg);
        let reserve_next = even.is_some_and(|v| v.first().is_some_and(|b| b & 0x80 != 0));
        // RFC 8656 §7.2 steps 5 and 8: a reservation names one port of one family.
        if (token.is_some() && (even.is_some() || family.is_some() || additional.is_some()))
            || (family.is_some() && additional.is_some())
            || (reserve_next && additional.is_some())
        {
            return Err(400);
        }
        let use_token = match token {
            None => None,
            Some(t) => Some(<[u8; 8]>::try_from(t).map_err(|_| 400u16)?),
        };
        let (mut want_v4, mut want_v6) = (true, false);
        if let Some(f) = family {
            match f.first() {
                Some(0x01) => {}
                Some(0x02) => (want_v4, want_v6) = (false, true),
                _ => return Err(440),
            }
        }
        let mut v6_refused = false;
        if let Some(f) = additional {
            if f.first() != Some(&0x02) {
                return Err(400);
            }
            if config.relay_v6 {
                want_v6 = true;
            } else {
                v6_refused = true;
            }
        }
        if (want_v4 && !config.relay_v4) || (want_v6 && !config.relay_v6) {
            return Err(440);
        }
        let lifetime = self.lifetime(msg, auth.tenant);
        let tenant = config.tenants.get(auth.tenant).ok_or(403u16)?;
        let user = self
            .shared
            .quotas
            .acquire(auth.tenant, &tenant.quotas, &auth.user_id)
            .map_err(|e| match e {
                QuotaError::User | QuotaError::Tenant => 486u16,
                QuotaError::Total => 508,
            })?;
        let new_token = reserve_next.then(|| {
            let mut t = [0u8; 8];
            self.rng.fill_bytes(&mut t);
            t
        });
        Ok(Box::new(PendingAllocate {
            client,
            tid: msg.transaction_id(),
            auth: auth.clone(),
            user,
            lifetime,
            want_v4,
            want_v6,
            v6_refused,
            even_port: even.is_some(),
            new_token,
            use_token,
            dont_fragment: msg.has(attr::DONT_FRAGMENT),
            tcp,
        }))
    }

    /// RFC 8656 §7.2: the requested lifetime, at least the default and at most the maximum;
    /// a tenant may cap both lower.
    fn lifetime(&self, msg: &Message<'_>, tenant: u32) -> u32 {
        let c = self.shared.config();
        let cap = c
            .tenants
            .get(tenant)
            .and_then(|t| t.max_lifetime)
            .unwrap_or(u32::MAX);
        let l = match msg.get_u32(attr::LIFETIME) {
            None => c.default_lifetime,
            Some(l) => l.max(c.default_lifetime).min(c.max_lifetime),
        };
        l.min(cap).max(1)
    }

    /// Finishes an Allocate once the IO layer has bound the relay sockets; the success
    /// response is in `output()`.
    pub fn complete_allocate(
        &mut self,
        p: PendingAllocate,
        relayed: RelayAddrs,
        now: Instant,
    ) -> AllocId {
        let id = match self.free_slots.pop() {
            Some(i) => AllocId(i),
            None => {
                self.slots.push(None);
                AllocId((self.slots.len() - 1) as u32)
            }
        };
        let expires = now + Duration::from_secs(u64::from(p.lifetime));
        let (bandwidth, relay_only) = self
            .shared
            .config()
            .tenants
            .get(p.auth.tenant)
            .map_or((None, false), |t| {
                (t.quotas.allocation_bandwidth, t.policy.is_relay_only())
            });
        let session = relay_only.then(|| {
            use std::hash::BuildHasher;
            rustc_hash::FxBuildHasher.hash_one(&p.auth.username)
        });
        self.slots[id.0 as usize] = Some(Allocation {
            client: p.client,
            tenant: p.auth.tenant,
            username: p.auth.username.clone(),
            user_id: p.auth.user_id.clone(),
            user: p.user,
            relayed,
            expires,
            permissions: Vec::new(),
            channels: Vec::new(),
            bucket: if p.tcp {
                None
            } else {
                bandwidth.map(TokenBucket::new)
            },
            tcp: p.tcp,
            tcp_bucket: if p.tcp {
                bandwidth.map(|b| Arc::new(AtomicBucket::new(b)))
            } else {
                None
            },
            session,
        });
        self.by_client.insert(p.client, id);
        if let Some(s) = session {
            let owner = (p.auth.tenant, s);
            self.shared.relayed_addrs().extend(
                [relayed.v4, relayed.v6]
                    .into_iter()
                    .flatten()
                    .map(|r| ((p.tcp, r), owner)),
            );
        }
        self.stats.tenant(p.auth.tenant).allocations_created += 1;
        self.count(p.auth.tenant, method::ALLOCATE, 0);
        let shared = Arc::clone(&self.shared);
        let mut b = Builder::new(&mut self.out, Class::Success, method::ALLOCATE, p.tid);
        if let Some(a) = relayed.v4 {
            b.xor_address(attr::XOR_RELAYED_ADDRESS, a);
        }
        if let Some(a) = relayed.v6 {
            b.xor_address(attr::XOR_RELAYED_ADDRESS, a);
        }
        b.u32(attr::LIFETIME, p.lifetime)
            .xor_address(attr::XOR_MAPPED_ADDRESS, p.client.addr);
        if let Some(t) = p.new_token {
            b.attr(attr::RESERVATION_TOKEN, &t);
        }
        if p.v6_refused {
            b.attr(attr::ADDRESS_ERROR_CODE, &ADDRESS_ERROR_V6);
        }
        sign(&mut b, &shared, &p.auth);
        self.cache_response(p.client, p.tid, now);
        id
    }

    /// Refuses a pending Allocate: 508 when no port is free or the reservation token is
    /// unknown; 420 when the DONT-FRAGMENT it asked for cannot be set on the relay socket
    /// (RFC 8656 §7.2 then treats the attribute as unknown).
    pub fn fail_allocate(&mut self, p: PendingAllocate, code: u16, now: Instant) {
        self.shared
            .quotas
            .release(p.auth.tenant, &p.auth.user_id, &p.user);
        self.count(p.auth.tenant, method::ALLOCATE, code);
        let shared = Arc::clone(&self.shared);
        let mut b = Builder::new(&mut self.out, Class::Error, method::ALLOCATE, p.tid);
        b.error(code, reason(code));
        if code == 420 {
            b.unknown_attributes(&[attr::DONT_FRAGMENT]);
        }
        sign(&mut b, &shared, &p.auth);
        self.cache_response(p.client, p.tid, now);
    }

    fn refresh(
        &mut self,
        msg: &Message<'_>,
        existing: Option<AllocId>,
        now: Instant,
    ) -> Result<u32, u16> {
        let Some(id) = existing else {
            return Err(437);
        };
        if let Some(f) = msg.get(attr::REQUESTED_ADDRESS_FAMILY) {
            let a = self.slot(id).ok_or(437u16)?;
            let held = match f.first() {
                Some(0x01) => a.relayed.v4.is_some(),
                Some(0x02) => a.relayed.v6.is_some(),
                _ => false,
            };
            if !held {
                return Err(443);
            }
        }
        if msg.get_u32(attr::LIFETIME) == Some(0) {
            self.free(id);
            return Ok(0);
        }
        let tenant = self.slot(id).map_or(0, |a| a.tenant);
        let lifetime = self.lifetime(msg, tenant);
        if let Some(Some(a)) = self.slots.get_mut(id.0 as usize) {
            a.expires = now + Duration::from_secs(u64::from(lifetime));
        }
        Ok(lifetime)
    }

    /// Checks a peer from XOR-PEER-ADDRESS: the normalized address, or the error code.
    fn check_peer(
        &mut self,
        msg: &Message<'_>,
        value: &[u8],
        a: AllocId,
    ) -> Result<SocketAddr, u16> {
        let peer = msg.xor_address(value).ok_or(400u16)?;
        let peer = SocketAddr::new(normalize(peer.ip()), peer.port());
        let Some(alloc) = self.slot(a) else {
            return Err(437);
        };
        if !alloc.family_ok(peer) {
            return Err(443);
        }
        // The allocation's own relayed address would reflect every packet back into itself.
        // Other allocations' relayed addresses stay reachable (when the policy allows their
        // IP): that is how two relay-only clients of one relay reach each other, and it
        // cannot loop, because a relay socket never sends to a listening port (the policy
        // refuses those) and so never becomes anyone's client.
        let own = [alloc.relayed.v4, alloc.relayed.v6];
        let tenant = alloc.tenant;
        if own.contains(&Some(peer))
            || !peer_allowed(&self.shared, &self.shared.config().tenants, alloc, peer)
        {
            self.stats.tenant(tenant).peer_denied += 1;
            return Err(403);
        }
        Ok(peer)
    }

    fn create_permission(
        &mut self,
        msg: &Message<'_>,
        existing: Option<AllocId>,
        now: Instant,
    ) -> Result<(), u16> {
        let Some(id) = existing else {
            return Err(437);
        };
        let mut peers = [None::<IpAddr>; 16];
        let mut n = 0;
        let values: Vec<&[u8]> = msg.get_all(attr::XOR_PEER_ADDRESS).collect();
        if values.is_empty() || values.len() > peers.len() {
            return Err(400);
        }
        for v in values {
            match self.check_peer(msg, v, id) {
                Ok(p) => {
                    peers[n] = Some(p.ip());
                    n += 1;
                }
                Err(code) => return Err(code),
            }
        }
        let max = self.shared.config().max_permissions;
        let Some(Some(a)) = self.slots.get_mut(id.0 as usize) else {
            return Err(437);
        };
        let expires = now + PERMISSION_LIFETIME;
        a.permissions.retain(|(_, exp)| *exp > now);
        let new = peers[..n]
            .iter()
            .flatten()
            .filter(|ip| !a.permissions.iter().any(|(p, _)| p == *ip))
            .count();
        if a.permissions.len() + new > max {
            return Err(508);
        }
        for ip in peers[..n].iter().flatten() {
            install_permission(a, *ip, expires, now, max);
        }
        Ok(())
    }

    fn channel_bind(
        &mut self,
        msg: &Message<'_>,
        existing: Option<AllocId>,
        now: Instant,
    ) -> Result<(), u16> {
        let Some(id) = existing else {
            return Err(437);
        };
        let (Some(number), Some(peer)) = (
            msg.get(attr::CHANNEL_NUMBER),
            msg.get(attr::XOR_PEER_ADDRESS),
        ) else {
            return Err(400);
        };
        if number.len() != 4 {
            return Err(400);
        }
        let number = u16::from_be_bytes([number[0], number[1]]);
        if !(stun::CHANNEL_MIN..=stun::CHANNEL_MAX).contains(&number) {
            return Err(400);
        }
        let peer = self.check_peer(msg, peer, id)?;
        let max = self.shared.config().max_permissions;
        let Some(Some(a)) = self.slots.get_mut(id.0 as usize) else {
            return Err(437);
        };
        // RFC 8656 §11.2: a channel stays tied to its peer, and a peer to its channel.
        if a.channels
            .iter()
            .any(|c| (c.number == number) != (c.peer == peer))
        {
            return Err(400);
        }
        // Atomic: both the channel and its permission are installed, or neither (508).
        let new_channel = !a.channels.iter().any(|c| c.number == number);
        if new_channel && a.channels.len() >= max {
            return Err(508);
        }
        if !install_permission(a, peer.ip(), now + PERMISSION_LIFETIME, now, max) {
            return Err(508);
        }
        let expires = now + CHANNEL_LIFETIME;
        match a.channels.iter_mut().find(|c| c.number == number) {
            Some(c) => c.expires = expires,
            None => a.channels.push(Channel {
                number,
                peer,
                expires,
            }),
        }
        Ok(())
    }

    fn free(&mut self, id: AllocId) {
        let Some(a) = self.slots.get_mut(id.0 as usize).and_then(Option::take) else {
            return;
        };
        self.by_client.remove(&a.client);
        self.shared.quotas.release(a.tenant, &a.user_id, &a.user);
        if a.session.is_some() {
            let mut relayed = self.shared.relayed_addrs();
            for r in [a.relayed.v4, a.relayed.v6].into_iter().flatten() {
                relayed.remove(&(a.tcp, r));
            }
        }
        self.free_slots.push(id.0);
        self.forget_tcp_connections(id);
        self.events.push_back(Event::Freed(id));
    }

    /// Records the TLS SNI host name a stream client sent, which selects its tenant.
    pub fn set_client_host(&mut self, client: ClientId, host: &str) {
        self.hosts.insert(client, host.into());
    }

    /// A stream client's connection closed: its allocation ends with it (RFC 8656 §2.1).
    pub fn close_client(&mut self, client: ClientId) {
        self.hosts.remove(&client);
        if let Some(id) = self.by_client.get(&client).copied() {
            self.free(id);
        }
    }

    pub fn has_allocation(&self, client: ClientId) -> bool {
        self.by_client.contains_key(&client)
    }

    /// Frees every allocation (shutdown after the drain grace time).
    pub fn free_all(&mut self) {
        for i in 0..self.slots.len() {
            self.free(AllocId(i as u32));
        }
    }

    /// When `handle_timeout` next has work; the caller may call it earlier.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.slots.iter().flatten().map(|a| a.expires).min()
    }

    /// After a reload: ends the allocations of revoked users and removed tenants.
    fn apply_reload(&mut self) {
        let generation = self.shared.generation();
        if generation == self.generation {
            return;
        }
        self.generation = generation;
        let config = self.shared.config();
        let ended: Vec<AllocId> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| {
                let a = slot.as_ref()?;
                let keep = config
                    .tenants
                    .get(a.tenant)
                    .is_some_and(|t| !t.is_revoked(&a.user_id, &a.username));
                (!keep).then_some(AllocId(i as u32))
            })
            .collect();
        drop(config);
        for id in ended {
            self.free(id);
        }
    }

    /// Expires allocations, permissions, channels and cached responses, and applies a
    /// reload's revocations.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.apply_reload();
        for i in 0..self.slots.len() {
            let expired = match &mut self.slots[i] {
                None => false,
                Some(a) if a.expires <= now => true,
                Some(a) => {
                    // Channels stay reserved for 5 minutes after they expire (RFC 8656 §12),
                    // so a late packet cannot reach a new peer bound to the old number.
                    a.permissions.retain(|(_, exp)| *exp > now);
                    a.channels.retain(|c| c.expires + PERMISSION_LIFETIME > now);
                    false
                }
            };
            if expired {
                self.free(AllocId(i as u32));
            }
        }
        self.expire_tcp_connections(now);
        while let Some(k) = self.response_order.front() {
            match self.responses.get(k) {
                Some((t, _)) if now.saturating_duration_since(*t) < RESPONSE_CACHE_TTL => break,
                _ => {
                    if let Some(k) = self.response_order.pop_front() {
                        self.responses.remove(&k);
                    }
                }
            }
        }
    }
}

/// Comprehension-required attributes this server does not know (RFC 8489 §7.3.1), at most 8.
/// CHANGE-REQUEST with no flags set asks for nothing, so classic clients' requests pass.
fn unknown_required(msg: &Message<'_>) -> ([u16; 8], usize) {
    let mut unknown = [0u16; 8];
    let mut n = 0;
    for t in msg.attribute_types() {
        let known = attr::is_known_required(t)
            || (t == attr::CHANGE_REQUEST && msg.get(t).is_some_and(|v| v.iter().all(|b| *b == 0)));
        if t < 0x8000 && !known && n < unknown.len() {
            unknown[n] = t;
            n += 1;
        }
    }
    (unknown, n)
}

/// ADDITIONAL-ADDRESS-FAMILY, under its RFC 8656 code or the draft code older coturn
/// clients send.
fn additional_family<'m>(msg: &Message<'m>) -> Option<&'m [u8]> {
    msg.get(attr::ADDITIONAL_ADDRESS_FAMILY)
        .or_else(|| msg.get(attr::ADDITIONAL_ADDRESS_FAMILY_DRAFT))
}

/// The size of an XOR-PEER-ADDRESS attribute for `peer`, with its header.
fn xor_address_len(peer: SocketAddr) -> usize {
    match peer {
        SocketAddr::V4(_) => 4 + 8,
        SocketAddr::V6(_) => 4 + 20,
    }
}

/// The largest UDP payload one datagram to `to` carries: 65535 less the UDP header, and for
/// IPv4 its own header too (IPv6's payload length leaves its header out).
fn max_udp_payload(to: SocketAddr) -> usize {
    match to {
        SocketAddr::V4(_) => 65_535 - 20 - 8,
        SocketAddr::V6(_) => 65_535 - 8,
    }
}

/// ADDRESS-ERROR-CODE (RFC 8656 §18.13) for a refused IPv6 additional family: 440.
const ADDRESS_ERROR_V6: [u8; 32] = *b"\x02\x00\x04\x28Address Family not Supported";

/// Whether allocation `a`'s tenant policy lets it reach `peer`; a tenant removed by a reload
/// reaches nothing, and a relay-only tenant's allocation reaches only its own session's
/// other allocations.
fn peer_allowed(shared: &Shared, tenants: &Tenants, a: &Allocation, peer: SocketAddr) -> bool {
    tenants.get(a.tenant).is_some_and(|t: &Tenant| {
        t.policy.check(peer).is_ok()
            && (!t.policy.is_relay_only()
                || a.session.is_some_and(|s| {
                    shared.relayed_addrs().get(&(a.tcp, peer)) == Some(&(a.tenant, s))
                }))
    })
}

/// Adds SOFTWARE, the integrity the request used, and FINGERPRINT.
fn sign(b: &mut Builder<'_>, shared: &Shared, auth: &Authenticated) {
    if let Some(s) = &shared.config().software {
        b.attr(attr::SOFTWARE, s.as_bytes());
    }
    if auth.sha256 {
        b.integrity_sha256(auth.key.bytes());
    } else {
        b.integrity_sha1(auth.key.bytes());
    }
    b.fingerprint();
}

fn install_permission(
    a: &mut Allocation,
    ip: IpAddr,
    expires: Instant,
    now: Instant,
    max: usize,
) -> bool {
    if let Some(p) = a.permissions.iter_mut().find(|(p, _)| *p == ip) {
        p.1 = expires;
        return true;
    }
    a.permissions.retain(|(_, exp)| *exp > now);
    if a.permissions.len() >= max {
        return false;
    }
    a.permissions.push((ip, expires));
    true
}

#[path = "tcp_alloc.rs"]
mod tcp_alloc;
pub use tcp_alloc::TcpQuota;

#[cfg(test)]
#[path = "scenarios.rs"]
mod scenarios;

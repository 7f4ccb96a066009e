//! What every shard of one relay shares: the configuration (swapped whole on reload), the
//! quotas, the nonce key, the relay port registry and its EVEN-PORT reservations, the tenant
//! names behind the metrics labels, the RFC 6062 connection ids, and the unauthenticated-reply
//! limiter. Touched when allocations are made or freed, on reload, and for replies to
//! strangers; never per relayed packet.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::auth::Nonces;
use crate::limiter::{self, Limiter, Rates};
use crate::ports::{PortLease, RelayPorts};
use crate::quota::QuotaState;
use crate::tenant::{Tenants, NO_TENANT};

use super::tcp::TcpConns;

/// How long a port reserved by EVEN-PORT's R bit is held (RFC 8656 §7.2: about 30 s).
pub const RESERVATION_TTL: Duration = Duration::from_secs(30);
/// Most ports held for EVEN-PORT reservations at once, so reservations cannot exhaust the
/// port range; beyond, Allocate with the R bit gets 508.
pub const MAX_RESERVATIONS: usize = 1024;

/// One relay address: where relay sockets bind, and what clients are told (they differ behind
/// 1:1 NAT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayAddress {
    pub bind: IpAddr,
    pub advertised: IpAddr,
}

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
    /// Shared relay ports: most peer endpoints (IP and port) one allocation may hold.
    pub max_peer_endpoints: usize,
    /// Most peer connections (connecting, waiting for ConnectionBind, or bound) one RFC 6062
    /// TCP allocation may hold.
    pub max_tcp_connections: usize,
    /// The relay addresses of each family this relay allocates on.
    pub relay_v4: Option<RelayAddress>,
    pub relay_v6: Option<RelayAddress>,
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

/// A port EVEN-PORT's R bit holds for a later Allocate with the RESERVATION-TOKEN.
#[derive(Debug)]
pub(super) struct Reservation {
    pub(super) lease: PortLease,
    /// Where the relay socket will bind, and what the client is told.
    pub(super) bind: SocketAddr,
    pub(super) advertised: SocketAddr,
    expires: Instant,
}

/// What every shard of one relay shares.
pub struct Shared {
    config: arc_swap::ArcSwap<CoreConfig>,
    /// RFC 6062 connection ids of every shard: a data connection's ConnectionBind may reach
    /// another shard than the one holding the allocation. Touched only by TCP-allocation
    /// requests, never per packet.
    pub(super) tcp_conns: Mutex<TcpConns>,
    pub quotas: QuotaState,
    pub nonces: Nonces,
    draining: AtomicBool,
    /// Tenant names by stable id (index); id 0 is requests no tenant claims. Only grows, by
    /// the names configured, so it bounds the `tenant` metrics label.
    tenant_names: Mutex<Vec<String>>,
    /// Bumped by each reload; shards then check their allocations against the new
    /// configuration (revoked users, removed tenants).
    generation: AtomicU64,
    /// Relayed addresses (TCP or not, address) of relay-only tenants' allocations (the test
    /// page), with their owner (tenant, username hash): such an allocation may reach only its
    /// own session's other allocations. Touched only for those tenants.
    relayed: Mutex<HashMap<(bool, SocketAddr), (u32, u64)>>,
    /// The relay ports in use, per relay address and transport.
    pub ports: Arc<RelayPorts>,
    /// EVEN-PORT reservations by token, across the shards: the second Allocate usually comes
    /// from another client port, which may hash to another shard.
    reservations: Mutex<HashMap<[u8; 8], Reservation>>,
    /// How many reservations are held, read without the lock by every timeout.
    reserved: AtomicUsize,
    /// Where the millisecond clock of the bandwidth buckets starts: one for every shard, since
    /// a user's and a tenant's buckets are shared by the shards.
    epoch: Instant,
    /// Error replies to unauthenticated UDP requests, per source, across the shards (the
    /// kernel spreads one source's ports over them). Touched only for such replies.
    replies: Mutex<Limiter>,
    /// Where Allocate requests go when this relay redirects them: the caller keeps it
    /// current. Read only by Allocate.
    redirect: arc_swap::ArcSwap<Redirects>,
}

/// Where a relay sends the clients it does not take: one sibling for while it drains, one
/// for when it holds its redirect limit ([`QuotaState::set_redirect_at`]); none, and the
/// client gets 508.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Redirects {
    pub draining: Option<Alternate>,
    pub full: Option<Alternate>,
}

/// A sibling relay that Allocate requests are sent to with 300 Try Alternate (RFC 8489 §10):
/// its address per transport for ALTERNATE-SERVER, and for TLS its host name for
/// ALTERNATE-DOMAIN, which the client checks the sibling's certificate against.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Alternate {
    pub udp: Vec<SocketAddr>,
    pub tcp: Vec<SocketAddr>,
    pub tls: Vec<SocketAddr>,
    pub domain: Option<String>,
}

impl Alternate {
    /// The address a client of this transport and address family is sent to: a sibling
    /// address of the same family (clients refuse another), for TLS with the domain.
    pub fn for_client(
        &self,
        stream: bool,
        tls: bool,
        v6: bool,
    ) -> Option<(SocketAddr, Option<&str>)> {
        let list = match (stream, tls) {
            (false, _) => &self.udp,
            (true, false) => &self.tcp,
            (true, true) => &self.tls,
        };
        let addr = list.iter().find(|a| a.is_ipv6() == v6)?;
        Some((*addr, if tls { self.domain.as_deref() } else { None }))
    }
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
        let replies = Mutex::new(reply_limiter(config.unauthenticated_replies_per_sec));
        Shared {
            config: arc_swap::ArcSwap::from_pointee(config),
            tcp_conns: Mutex::new(TcpConns::default()),
            quotas,
            nonces,
            draining: AtomicBool::new(false),
            tenant_names: Mutex::new(names),
            generation: AtomicU64::new(0),
            relayed: Mutex::default(),
            ports,
            reservations: Mutex::default(),
            reserved: AtomicUsize::new(0),
            epoch,
            replies,
            redirect: arc_swap::ArcSwap::from_pointee(Redirects::default()),
        }
    }

    /// Where Allocate requests go from now on, when this relay drains or is full.
    pub fn set_redirect(&self, to: Redirects) {
        self.redirect.store(Arc::new(to));
    }

    /// Where Allocate requests go now when this relay drains or is full.
    pub fn redirect(&self) -> Arc<Redirects> {
        self.redirect.load_full()
    }

    /// The sibling a client is sent to now (None: this relay takes it, or refuses it):
    /// while it drains, its draining sibling; at its redirect limit, its full sibling.
    pub fn redirecting(&self) -> Option<Alternate> {
        let r = self.redirect();
        if self.is_draining() {
            return r.draining.clone();
        }
        let at = self.quotas.redirect_at();
        if at > 0 && self.quotas.active() >= at {
            return r.full.clone();
        }
        None
    }

    pub(super) fn replies(&self) -> MutexGuard<'_, Limiter> {
        lock(&self.replies)
    }

    /// Milliseconds since the epoch, the clock of the bandwidth buckets.
    #[inline]
    pub fn millis(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    pub(super) fn relayed_addrs(&self) -> MutexGuard<'_, HashMap<(bool, SocketAddr), (u32, u64)>> {
        lock(&self.relayed)
    }

    /// Tenant names by stable id, for metrics labels.
    pub fn tenant_names(&self) -> Vec<String> {
        lock(&self.tenant_names).clone()
    }

    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The current settings; `reload` replaces them between two requests.
    pub fn config(&self) -> arc_swap::Guard<Arc<CoreConfig>> {
        self.config.load()
    }

    /// Replaces credentials, policy and limits (SIGHUP); allocations keep relaying, except
    /// those of revoked users and removed tenants, which each shard ends at its next timeout.
    pub fn reload(&self, mut config: CoreConfig) {
        assign_tenant_ids(&mut config.tenants, &mut lock(&self.tenant_names));
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

    /// Holds `reservation` under `token`, unless [`MAX_RESERVATIONS`] are held already.
    pub(super) fn reserve(
        &self,
        token: [u8; 8],
        lease: PortLease,
        bind: SocketAddr,
        advertised: SocketAddr,
        now: Instant,
    ) -> bool {
        let mut r = lock(&self.reservations);
        if r.len() >= MAX_RESERVATIONS {
            return false;
        }
        r.insert(
            token,
            Reservation {
                lease,
                bind,
                advertised,
                expires: now + RESERVATION_TTL,
            },
        );
        self.reserved.store(r.len(), Ordering::Relaxed);
        true
    }

    /// Whether another reservation fits.
    pub(super) fn may_reserve(&self) -> bool {
        self.reserved.load(Ordering::Relaxed) < MAX_RESERVATIONS
    }

    /// Takes the reservation made under `token`.
    pub(super) fn take_reservation(&self, token: &[u8; 8]) -> Option<Reservation> {
        let mut r = lock(&self.reservations);
        let taken = r.remove(token);
        self.reserved.store(r.len(), Ordering::Relaxed);
        taken
    }

    /// Gives back the ports of reservations no Allocate claimed in time.
    pub(super) fn expire_reservations(&self, now: Instant) {
        if self.reserved.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut r = lock(&self.reservations);
        r.retain(|_, x| x.expires > now);
        self.reserved.store(r.len(), Ordering::Relaxed);
    }
}

/// A lock that a panicking holder did not poison for the others: the data it guards stays
/// consistent between statements.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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

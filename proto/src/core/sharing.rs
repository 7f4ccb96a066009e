//! Shared relay ports (opt-in): a shard relays the UDP allocations it can through a few
//! sockets per relay address instead of one port each, and tells them apart by the exact peer
//! endpoint (IP and port) each allocation named.
//!
//! The rules, each enforced here and nowhere else:
//!
//! - **Delivery by exact endpoint.** A datagram arriving on a shared port reaches the one
//!   allocation on that port that holds its source endpoint, found by one hash probe, and
//!   only while that allocation holds a live permission for the endpoint's IP; any other
//!   datagram is dropped ([`CoreStats::shared_port_unmatched`]). Receiving claims nothing,
//!   and an IP-wide permission delivers nothing on its own.
//! - **Holding an endpoint.** An allocation holds an endpoint once it named it (the
//!   XOR-PEER-ADDRESS of its CreatePermission, port included, its ChannelBind, a Send
//!   indication, or ChannelData on a channel bound to it), with a live permission for its IP,
//!   while no other allocation on the port holds it. It holds it until that permission ends
//!   (the allocation's timer fires at the permission's expiry) or the allocation ends.
//!   ChannelData and Send go out only to endpoints the allocation holds at that moment.
//! - **One holder per endpoint and port.** A request naming an endpoint another allocation
//!   on the port holds is refused (403 to CreatePermission and ChannelBind, a dropped Send or
//!   ChannelData), counted in [`CoreStats::shared_port_conflicts`]; every check on the
//!   client's own request comes first, so the answer says nothing about other allocations
//!   unless the endpoint itself is what conflicts.
//! - **A cap per allocation.** At most `max_peer_endpoints` endpoints each (coturn's
//!   default, 256); beyond, 508 and dropped Sends ([`CoreStats::shared_port_endpoint_limit`]).
//!   Endpoints are kept in the allocation's own list beside the port's index, so ending one
//!   costs time in proportion to its own endpoints, never a scan of others'.
//! - **A port serves one tenant at a time.** A port is free until an allocation is given it,
//!   then serves that allocation's tenant until its last allocation ends; so no tenant can
//!   block, receive or reach another tenant's flows through a port. A tenant may take free
//!   ports up to an equal share of the family's ports among the tenants holding ports on the
//!   shard; an allocation whose tenant has no port it may use gets a dedicated port instead
//!   ([`CoreStats::shared_port_fallbacks`]).
//! - **Spreading.** Among the ports its tenant may use, an allocation is given the one with
//!   the fewest allocations from its client's IP, then the fewest in all, so that two clients
//!   behind one address (an office's NAT, or the probe's two allocations) get different ports
//!   and can reach each other's relayed addresses; EVEN-PORT without its R bit, an even one
//!   (odd ones are preferred for the others, so the even ones stay free for it). EVEN-PORT's R
//!   bit, RESERVATION-TOKEN, DONT-FRAGMENT, RFC 6062 TCP and relay-only tenants keep dedicated
//!   ports: their semantics need a port of their own.
//!
//! [`CoreStats::shared_port_unmatched`]: super::CoreStats::shared_port_unmatched
//! [`CoreStats::shared_port_conflicts`]: super::CoreStats::shared_port_conflicts
//! [`CoreStats::shared_port_endpoint_limit`]: super::CoreStats::shared_port_endpoint_limit
//! [`CoreStats::shared_port_fallbacks`]: super::CoreStats::shared_port_fallbacks

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use rustc_hash::FxHashMap;

use crate::ports::PortLease;

use super::{live_mut, AllocId, Allocation, Core, PeerAction, Slot};

/// One of a shard's shared relay sockets: its family and its index among that family's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SharedPortId {
    pub v6: bool,
    pub index: u16,
}

#[derive(Debug)]
struct Port {
    /// Held for the shard's lifetime.
    _lease: PortLease,
    bind: SocketAddr,
    advertised: SocketAddr,
    allocations: u32,
    /// The tenant it serves while `allocations > 0`.
    tenant: u32,
}

/// Why an allocation cannot hold an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Another allocation on the port holds it: 403.
    Held,
    /// The allocation holds `max_peer_endpoints` already: 508.
    Full,
}

impl Refusal {
    pub(super) fn code(self) -> u16 {
        match self {
            Refusal::Held => 403,
            Refusal::Full => 508,
        }
    }
}

/// The shard's shared ports and who holds which peer endpoint on them.
#[derive(Debug, Default)]
pub(super) struct Sharing {
    /// By family: IPv4, IPv6.
    ports: [Vec<Port>; 2],
    /// Who holds each peer endpoint of a port. An entry names a live allocation that lists
    /// the endpoint among its own; its hold is good while it has a permission for the IP.
    endpoints: FxHashMap<(SharedPortId, SocketAddr), AllocId>,
    /// Allocations on a port by their client's IP.
    clients: FxHashMap<(SharedPortId, IpAddr), u32>,
    /// Ports each tenant holds, by family.
    held: [FxHashMap<u32, u32>; 2],
}

impl Sharing {
    pub(super) fn enabled(&self) -> bool {
        !self.ports[0].is_empty() || !self.ports[1].is_empty()
    }

    /// The port of family `v6` an allocation of `tenant` from `client` would be given (an
    /// even one when `even`), by the rules in the module docs; None when its tenant may use
    /// none. Changes nothing: [`Sharing::take`] counts it.
    pub(super) fn pick(&self, v6: bool, even: bool, client: IpAddr, tenant: u32) -> Option<u16> {
        let family = usize::from(v6);
        let ports = &self.ports[family];
        let mine = self.held[family].get(&tenant).copied().unwrap_or(0) as usize;
        let tenants = self.held[family].len() + usize::from(mine == 0);
        let share = ports.len().div_ceil(tenants.max(1));
        ports
            .iter()
            .enumerate()
            .filter(|(_, p)| !even || p.advertised.port() % 2 == 0)
            .filter(|(_, p)| match p.allocations {
                0 => mine < share,
                _ => p.tenant == tenant,
            })
            .min_by_key(|(i, p)| {
                let id = SharedPortId {
                    v6,
                    index: *i as u16,
                };
                let same_ip = self.clients.get(&(id, client)).copied().unwrap_or(0);
                (same_ip, p.allocations, p.advertised.port() % 2 == 0)
            })
            .map(|(i, _)| i as u16)
    }

    /// Counts an allocation of `tenant` from `client` on port `index` of family `v6` (as
    /// [`Sharing::pick`] chose): its id, where it is bound and what the client is told.
    pub(super) fn take(
        &mut self,
        v6: bool,
        index: u16,
        client: IpAddr,
        tenant: u32,
    ) -> (SharedPortId, SocketAddr, SocketAddr) {
        let family = usize::from(v6);
        let port = &mut self.ports[family][usize::from(index)];
        if port.allocations == 0 {
            port.tenant = tenant;
            *self.held[family].entry(tenant).or_default() += 1;
        }
        port.allocations += 1;
        let id = SharedPortId { v6, index };
        *self.clients.entry((id, client)).or_default() += 1;
        (id, port.bind, port.advertised)
    }

    /// Forgets an allocation on `port`: the port's counts and the endpoints it holds there.
    pub(super) fn release(
        &mut self,
        alloc: AllocId,
        port: SharedPortId,
        client: IpAddr,
        endpoints: &[SocketAddr],
    ) {
        let family = usize::from(port.v6);
        if let Some(p) = self.ports[family].get_mut(usize::from(port.index)) {
            p.allocations = p.allocations.saturating_sub(1);
            if p.allocations == 0 {
                if let Some(n) = self.held[family].get_mut(&p.tenant) {
                    *n -= 1;
                    if *n == 0 {
                        self.held[family].remove(&p.tenant);
                    }
                }
            }
        }
        if let Some(n) = self.clients.get_mut(&(port, client)) {
            *n -= 1;
            if *n == 0 {
                self.clients.remove(&(port, client));
            }
        }
        for ep in endpoints.iter().filter(|e| e.is_ipv6() == port.v6) {
            self.forget(alloc, port, *ep);
        }
    }

    /// Endpoints indexed on every port.
    #[cfg(test)]
    pub(super) fn indexed(&self) -> usize {
        self.endpoints.len()
    }

    /// The allocation holding `peer` on `port` by the index (its permission not checked).
    #[inline]
    pub(super) fn holder(&self, port: SharedPortId, peer: SocketAddr) -> Option<AllocId> {
        self.endpoints.get(&(port, peer)).copied()
    }

    /// Removes `alloc`'s entry for `peer` on `port`, if the entry is still its own.
    fn forget(&mut self, alloc: AllocId, port: SharedPortId, peer: SocketAddr) {
        if self.endpoints.get(&(port, peer)) == Some(&alloc) {
            self.endpoints.remove(&(port, peer));
        }
    }

    /// Drops `alloc`'s endpoints on `ip` (its permission for `ip` ended), from its own list
    /// and the port's index.
    pub(super) fn drop_ip(
        &mut self,
        alloc: AllocId,
        port: SharedPortId,
        ip: IpAddr,
        endpoints: &mut Vec<SocketAddr>,
    ) {
        endpoints.retain(|ep| {
            if ep.ip() != ip {
                return true;
            }
            self.forget(alloc, port, *ep);
            false
        });
    }
}

/// Whether the allocation `id` in `slots` has a live permission for `peer`'s IP: what makes
/// its hold of `peer` good.
fn holds(slots: &[Slot], id: AllocId, peer: SocketAddr, now: Instant) -> bool {
    slots
        .get(id.index())
        .filter(|s| s.generation == id.generation)
        .and_then(|s| s.allocation.as_ref())
        .is_some_and(|a| a.has_permission(peer.ip(), now))
}

impl Core {
    /// Adds one of the shard's shared relay sockets, bound at `bind` (on the relay address of
    /// its family, with a port of the range held by `lease`); `advertised` is what clients are
    /// told. Called by the IO layer at start, before any packet; allocations are then given
    /// these ports where they can be (see the module docs).
    pub fn add_shared_port(
        &mut self,
        lease: PortLease,
        bind: SocketAddr,
        advertised: SocketAddr,
    ) -> SharedPortId {
        let v6 = bind.is_ipv6();
        let ports = &mut self.sharing.ports[usize::from(v6)];
        ports.push(Port {
            _lease: lease,
            bind,
            advertised,
            allocations: 0,
            tenant: 0,
        });
        SharedPortId {
            v6,
            index: (ports.len() - 1) as u16,
        }
    }

    /// Whether allocation `id` could hold each of `peers` (endpoints of its shared ports;
    /// port 0 names none) beside those it holds: the cap first, then the other holders.
    pub(super) fn may_hold(
        &self,
        id: AllocId,
        peers: &[SocketAddr],
        now: Instant,
    ) -> Result<(), Refusal> {
        let Some(a) = self.slot(id) else {
            return Ok(());
        };
        let mut wanted: Vec<(SharedPortId, SocketAddr)> = peers
            .iter()
            .filter(|p| p.port() != 0)
            .filter_map(|p| Some((a.shared_port(*p)?, *p)))
            .filter(|(port, p)| self.sharing.holder(*port, *p) != Some(id))
            .collect();
        wanted.sort_unstable_by_key(|(_, p)| *p);
        wanted.dedup();
        let max = self.shared.config().max_peer_endpoints;
        let new = wanted
            .iter()
            .filter(|(_, p)| !a.endpoints.contains(p))
            .count();
        if a.endpoints.len() + new > max {
            return Err(Refusal::Full);
        }
        let held = wanted.iter().any(|(port, p)| {
            self.sharing
                .holder(*port, *p)
                .is_some_and(|other| holds(&self.slots, other, *p, now))
        });
        if held {
            return Err(Refusal::Held);
        }
        Ok(())
    }

    /// Makes allocation `id` the holder of `peers` on its shared ports, after
    /// [`Core::may_hold`] said it may (and its permissions for their IPs are installed).
    pub(super) fn hold(&mut self, id: AllocId, peers: &[SocketAddr]) {
        let Some(a) = live_mut(&mut self.slots, id) else {
            return;
        };
        for &peer in peers.iter().filter(|p| p.port() != 0) {
            let Some(port) = a.shared_port(peer) else {
                continue;
            };
            self.sharing.endpoints.insert((port, peer), id);
            if !a.endpoints.contains(&peer) {
                a.endpoints.push(peer);
            }
        }
    }

    /// For ChannelData and Send on shared ports: whether allocation `id` holds `peer` now, or
    /// may take it (it has a live permission for its IP, no other allocation holds it, and
    /// it is within its cap), in which case it holds it from now on. Refusals are counted.
    pub(super) fn hold_to_send(
        &mut self,
        id: AllocId,
        port: SharedPortId,
        peer: SocketAddr,
        now: Instant,
    ) -> bool {
        if self.sharing.holder(port, peer) == Some(id) {
            return true;
        }
        let permitted = self
            .slot(id)
            .is_some_and(|a| a.has_permission(peer.ip(), now));
        if !permitted {
            self.stats.dropped_packets += 1;
            return false;
        }
        match self.may_hold(id, &[peer], now) {
            Ok(()) => {
                self.hold(id, &[peer]);
                true
            }
            Err(Refusal::Held) => {
                self.stats.shared_port_conflicts += 1;
                false
            }
            Err(Refusal::Full) => {
                self.stats.shared_port_endpoint_limit += 1;
                false
            }
        }
    }

    /// Handles a datagram a peer sent to shared port `port`: it goes to the allocation that
    /// holds its source endpoint (see the module docs), then as [`Core::handle_peer`].
    #[inline]
    pub fn handle_shared_peer(
        &mut self,
        port: SharedPortId,
        peer: SocketAddr,
        buf: &mut [u8],
        len: usize,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> PeerAction {
        let peer = SocketAddr::new(crate::policy::normalize(peer.ip()), peer.port());
        match self.sharing.holder(port, peer) {
            Some(id) => self.handle_peer(id, peer, buf, len, now, out),
            None => {
                self.stats.shared_port_unmatched += 1;
                PeerAction::Drop
            }
        }
    }

    /// Gives an allocation on shared ports back: its ports' counts and its endpoints.
    pub(super) fn release_shared(&mut self, id: AllocId, a: &Allocation) {
        for port in a.shared.into_iter().flatten() {
            self.sharing
                .release(id, port, a.client.addr.ip(), &a.endpoints);
        }
    }

    /// Whether allocation `id` relays to `peer` through a shared port.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn relays_shared(&self, id: AllocId, peer: SocketAddr) -> bool {
        self.slot(id).is_some_and(|a| a.shared_port(peer).is_some())
    }

    /// The endpoints allocation `id` holds on its shared ports now (for tests and the fuzz
    /// harness's checks).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn held_endpoints(&self, id: AllocId, now: Instant) -> Vec<SocketAddr> {
        let Some(a) = self.slot(id) else {
            return Vec::new();
        };
        a.endpoints
            .iter()
            .copied()
            .filter(|p| {
                a.shared_port(*p)
                    .is_some_and(|port| self.sharing.holder(port, *p) == Some(id))
                    && a.has_permission(p.ip(), now)
            })
            .collect()
    }

    /// Checks the sharing tables against the allocations (for tests and the fuzz harness):
    /// every indexed endpoint names a live allocation on that port that lists it, within
    /// its cap; every port's counts and tenant match its allocations.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn check_sharing(&self) {
        let max = self.shared.config().max_peer_endpoints;
        for (&(port, peer), &id) in &self.sharing.endpoints {
            let a = self
                .slot(id)
                .expect("an indexed endpoint's allocation lives");
            assert_eq!(a.shared_port(peer), Some(port), "indexed on its own port");
            assert!(a.endpoints.contains(&peer), "listed by its holder");
        }
        for family in 0..2 {
            let mut held: FxHashMap<u32, u32> = FxHashMap::default();
            for (i, p) in self.sharing.ports[family].iter().enumerate() {
                let id = SharedPortId {
                    v6: family == 1,
                    index: i as u16,
                };
                let on: Vec<&Allocation> = self
                    .slots
                    .iter()
                    .filter_map(|s| s.allocation.as_ref())
                    .filter(|a| a.shared[family] == Some(id))
                    .collect();
                assert_eq!(p.allocations as usize, on.len(), "port {i}'s count");
                if !on.is_empty() {
                    *held.entry(p.tenant).or_default() += 1;
                    assert!(on.iter().all(|a| a.tenant == p.tenant), "one tenant a port");
                }
            }
            assert_eq!(held, self.sharing.held[family], "ports held per tenant");
        }
        for a in self.slots.iter().filter_map(|s| s.allocation.as_ref()) {
            assert!(a.endpoints.len() <= max, "{} endpoints", a.endpoints.len());
        }
    }
}

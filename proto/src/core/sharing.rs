//! Shared relay ports (opt-in): a shard relays the UDP allocations it can through a few
//! sockets per relay address instead of one port each, and tells them apart by relay port and
//! peer address.
//!
//! - An allocation is given the shard's shared port (per family) with the fewest allocations
//!   from its client's IP, then the fewest in all, so that two clients behind one address (an
//!   office's NAT, or the probe's two allocations) get different ports and can reach each
//!   other's relayed addresses; EVEN-PORT without its R bit, an even one (odd ones are
//!   preferred for the others, so the even ones stay free for it). EVEN-PORT's R bit, RESERVATION-TOKEN, DONT-FRAGMENT, RFC 6062
//!   TCP and relay-only tenants keep dedicated ports: their semantics need a port of their own
//!   (relay-only tenants' clients reach each other's relayed addresses, which on one shared
//!   port would be their own).
//! - A peer *transport address* on one shared port belongs to at most one allocation at a
//!   time: the one that claimed it, by a ChannelBind, a Send indication, or receiving the
//!   first datagram from it (below), for as long as that allocation keeps its permission for
//!   the peer's IP. Another allocation on the same port wanting the same peer address gets 403
//!   to its ChannelBind and its Send indications are dropped; both are counted
//!   ([`CoreStats::shared_port_conflicts`]). A flow that only receives keeps its claim, so no
//!   other allocation of the port can take its peer over by sending to it. So one peer address
//!   (an SFU's port, say) is reachable from at most one allocation per shared port: shards x
//!   `shared_relay_ports` at once. The client that got 403 can allocate again (it may land on
//!   another port) or relay through its own allocation's Send path to another peer port.
//! - A datagram from a peer goes to the allocation that claimed its address (one hash probe);
//!   unclaimed (ICE checks often arrive before the client sent anything), to the one
//!   allocation on that port holding a permission for the peer's IP, which then claims it;
//!   with none or several, it is dropped and counted ([`CoreStats::shared_port_unmatched`]).
//!   Finding that one looks at the allocations of the port indexed under the peer's IP (never
//!   the whole port), stopping at the second with a live permission.
//!
//! [`CoreStats::shared_port_conflicts`]: super::CoreStats::shared_port_conflicts
//! [`CoreStats::shared_port_unmatched`]: super::CoreStats::shared_port_unmatched

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use rustc_hash::FxHashMap;

use crate::ports::PortLease;

use super::{live_mut, AllocId, Core, PeerAction};

/// Peer addresses one allocation may claim on its shared port; beyond, its Send indications
/// still go out but claim nothing, and the answers reach it only while no other allocation on
/// the port has a permission for the peer's IP. Bounds what one client makes the shard hold.
pub(super) const MAX_CLAIMS: usize = 64;

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
}

/// The shard's shared ports and who relays to which peer through them.
#[derive(Debug, Default)]
pub(super) struct Sharing {
    /// By family: IPv4, IPv6.
    ports: [Vec<Port>; 2],
    /// Who each peer address of a port belongs to; a claim holds while its allocation lives
    /// and has a permission for the peer's IP (checked on use).
    claims: FxHashMap<(SharedPortId, SocketAddr), AllocId>,
    /// Allocations on a port with a permission (perhaps expired: checked on use) for an IP.
    by_ip: FxHashMap<(SharedPortId, IpAddr), Vec<AllocId>>,
    /// Allocations on a port by their client's IP.
    clients: FxHashMap<(SharedPortId, IpAddr), u32>,
}

impl Sharing {
    pub(super) fn enabled(&self) -> bool {
        !self.ports[0].is_empty() || !self.ports[1].is_empty()
    }

    /// The port of family `v6` (an even one when `even`) with the fewest allocations of
    /// `client`'s IP, then the fewest in all (odd ones first, keeping even ones for
    /// EVEN-PORT), counted as taken: its id, where it is bound and what the client is told.
    pub(super) fn assign(
        &mut self,
        v6: bool,
        even: bool,
        client: IpAddr,
    ) -> Option<(SharedPortId, SocketAddr, SocketAddr)> {
        let clients = &self.clients;
        let (i, port) = self.ports[usize::from(v6)]
            .iter_mut()
            .enumerate()
            .filter(|(_, p)| !even || p.advertised.port() % 2 == 0)
            .min_by_key(|(i, p)| {
                let id = SharedPortId {
                    v6,
                    index: *i as u16,
                };
                let same_ip = clients.get(&(id, client)).copied().unwrap_or(0);
                (same_ip, p.allocations, p.advertised.port() % 2 == 0)
            })?;
        port.allocations += 1;
        let id = SharedPortId {
            v6,
            index: i as u16,
        };
        *self.clients.entry((id, client)).or_default() += 1;
        Some((id, port.bind, port.advertised))
    }

    /// Whether a port of family `v6` (an even one when `even`) is there to assign.
    pub(super) fn has_family(&self, v6: bool, even: bool) -> bool {
        self.ports[usize::from(v6)]
            .iter()
            .any(|p| !even || p.advertised.port() % 2 == 0)
    }

    /// Forgets an allocation: its port's count, its claims and its place in the IP index.
    pub(super) fn release(
        &mut self,
        alloc: AllocId,
        port: SharedPortId,
        client: IpAddr,
        claimed: &[SocketAddr],
        ips: impl Iterator<Item = IpAddr>,
    ) {
        if let Some(p) = self.ports[usize::from(port.v6)].get_mut(usize::from(port.index)) {
            p.allocations = p.allocations.saturating_sub(1);
        }
        if let Some(n) = self.clients.get_mut(&(port, client)) {
            *n -= 1;
            if *n == 0 {
                self.clients.remove(&(port, client));
            }
        }
        for peer in claimed {
            if self.claims.get(&(port, *peer)) == Some(&alloc) {
                self.claims.remove(&(port, *peer));
            }
        }
        for ip in ips {
            self.unindex(alloc, port, ip);
        }
    }

    /// Records that `alloc` holds a permission for `ip` on `port`.
    pub(super) fn index(&mut self, alloc: AllocId, port: SharedPortId, ip: IpAddr) {
        let list = self.by_ip.entry((port, ip)).or_default();
        if !list.contains(&alloc) {
            list.push(alloc);
        }
    }

    pub(super) fn unindex(&mut self, alloc: AllocId, port: SharedPortId, ip: IpAddr) {
        if let Some(list) = self.by_ip.get_mut(&(port, ip)) {
            list.retain(|a| *a != alloc);
            if list.is_empty() {
                self.by_ip.remove(&(port, ip));
            }
        }
    }

    /// Claims `peer` on `port` for `alloc` (the caller checked that no other allocation
    /// holds it). True when the claim is new to `alloc`.
    pub(super) fn claim(&mut self, port: SharedPortId, peer: SocketAddr, alloc: AllocId) -> bool {
        self.claims.insert((port, peer), alloc) != Some(alloc)
    }

    /// Forgets `alloc`'s claims of peers on `ip` (its permission for `ip` ended).
    pub(super) fn drop_claims(
        &mut self,
        alloc: AllocId,
        port: SharedPortId,
        ip: IpAddr,
        claimed: &mut Vec<SocketAddr>,
    ) {
        claimed.retain(|peer| {
            if peer.ip() != ip {
                return true;
            }
            if self.claims.get(&(port, *peer)) == Some(&alloc) {
                self.claims.remove(&(port, *peer));
            }
            false
        });
    }
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
        });
        SharedPortId {
            v6,
            index: (ports.len() - 1) as u16,
        }
    }

    /// The allocation other than `me` that holds `peer` on `port` now.
    pub(super) fn claim_holder(
        &self,
        port: SharedPortId,
        peer: SocketAddr,
        me: AllocId,
        now: Instant,
    ) -> Option<AllocId> {
        let owner = *self.sharing.claims.get(&(port, peer))?;
        (owner != me && self.holds(owner, peer, now)).then_some(owner)
    }

    /// Whether `owner` lives and has a permission for `peer`'s IP: what makes its claim hold.
    fn holds(&self, owner: AllocId, peer: SocketAddr, now: Instant) -> bool {
        self.slot(owner)
            .is_some_and(|a| a.has_permission(peer.ip(), now))
    }

    /// The one allocation on `port` with a live permission for `peer`'s IP, if exactly one.
    fn only_permitted(
        &self,
        port: SharedPortId,
        peer: SocketAddr,
        now: Instant,
    ) -> Option<AllocId> {
        let list = self.sharing.by_ip.get(&(port, peer.ip()))?;
        let mut found = None;
        for &id in list {
            if self.holds(id, peer, now) {
                if found.is_some() {
                    return None;
                }
                found = Some(id);
            }
        }
        found
    }

    /// Claims `peer` on `port` for allocation `id` within its [`MAX_CLAIMS`] (the caller
    /// checked that no other allocation holds it).
    pub(super) fn claim_for(&mut self, id: AllocId, port: SharedPortId, peer: SocketAddr) {
        let Some(a) = live_mut(&mut self.slots, id) else {
            return;
        };
        if a.claimed.contains(&peer) {
            self.sharing.claim(port, peer, id);
        } else if a.claimed.len() < MAX_CLAIMS && self.sharing.claim(port, peer, id) {
            a.claimed.push(peer);
        }
    }

    /// Handles a datagram a peer sent to shared port `port`: finds the allocation it is for
    /// (see the module docs), then as [`Core::handle_peer`].
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
        let owner = self
            .sharing
            .claims
            .get(&(port, peer))
            .copied()
            .filter(|&id| self.holds(id, peer, now));
        let alloc = match owner {
            Some(id) => Some(id),
            None => {
                let found = self.only_permitted(port, peer, now);
                if let Some(id) = found {
                    self.claim_for(id, port, peer);
                }
                found
            }
        };
        match alloc {
            Some(id) => self.handle_peer(id, peer, buf, len, now, out),
            None => {
                self.stats.shared_port_unmatched += 1;
                PeerAction::Drop
            }
        }
    }
}

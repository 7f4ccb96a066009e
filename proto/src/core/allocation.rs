//! The allocation lifecycle: Allocate (checks, quota, relay ports drawn from the registry, the
//! caller binding them, the answer), Refresh, CreatePermission and ChannelBind, and the end of
//! an allocation.
//!
//! An Allocate that passes every check takes a slot at once, in a binding state that holds
//! what the answer needs; the caller binds the sockets [`RelayBind`] names and reports with
//! [`Core::relay_bound`]. A port another process holds is drawn again, and the ports drawn
//! before stay held until the allocation is bound, so that they are not drawn twice.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use rand::RngCore;

use crate::auth::Authenticated;
use crate::policy::normalize;
use crate::ports::{PortLease, RelayTransport};
use crate::quota::{AtomicBucket, QuotaError, TokenBucket};
use crate::stun::{self, attr, method, Builder, Class, Message, TransactionId};

use super::data::peer_allowed;
use super::responses::{reason, sign};
use super::{
    live_mut, AllocId, Allocation, BindFailure, BindOutcome, Channel, ClientId, Core, EndReason,
    Event, RelayAddrs, RelayBind, Session, Slot, Usage, CHANNEL_LIFETIME, PERMISSION_LIFETIME,
};

/// Transport protocol numbers in REQUESTED-TRANSPORT.
const PROTO_UDP: u8 = 17;
const PROTO_TCP: u8 = 6;
/// Ports drawn per allocation before it gets 508: a port the registry hands out may still be
/// held by another process.
const BIND_ATTEMPTS: u32 = 16;
/// ADDRESS-ERROR-CODE (RFC 8656 §18.13) for a refused IPv6 additional family: 440.
const ADDRESS_ERROR_V6: [u8; 32] = *b"\x02\x00\x04\x28Address Family not Supported";

/// An Allocate waiting for its relay sockets: what its answer needs.
#[derive(Debug)]
pub(super) struct Binding {
    tid: TransactionId,
    auth: Authenticated,
    lifetime: u32,
    /// ADDITIONAL-ADDRESS-FAMILY asked for IPv6 that this relay lacks: answer with
    /// ADDRESS-ERROR-CODE 440 beside the IPv4 allocation.
    v6_refused: bool,
    want_v4: bool,
    want_v6: bool,
    /// EVEN-PORT: even ports; with the R bit, the next port is reserved under `new_token`.
    even: bool,
    new_token: Option<[u8; 8]>,
    /// The port reserved for `new_token`, until the allocation is bound.
    next: Option<Drawn>,
    /// The ports came from a reservation: no other may be drawn.
    reserved: bool,
    dont_fragment: bool,
    /// Ports the caller could not bind, held until the allocation is bound.
    refused: Vec<PortLease>,
    tries: u32,
    /// The least of the allocation's, its user's and its tenant's bandwidth quotas, bytes
    /// per second: told to the client (BANDWIDTH).
    bandwidth: Option<u64>,
}

/// One relay port drawn: its lease, where the socket binds and what the client is told.
#[derive(Debug)]
struct Drawn {
    lease: PortLease,
    bind: SocketAddr,
    advertised: SocketAddr,
}

/// The ports of one draw, by family.
#[derive(Debug, Default)]
struct Draw {
    v4: Option<Drawn>,
    v6: Option<Drawn>,
    next: Option<Drawn>,
}

impl Core {
    /// Allocate (RFC 8656 §7.2, RFC 6062 §5.1): the checks, the quota, and the relay ports to
    /// bind; the answer comes with [`Core::relay_bound`].
    pub(super) fn allocate(
        &mut self,
        msg: &Message<'_>,
        client: ClientId,
        auth: &Authenticated,
        existing: Option<AllocId>,
        now: Instant,
        unix: u64,
    ) -> Result<RelayBind, u16> {
        let config = self.shared.config();
        if existing.is_some() {
            return Err(437);
        }
        // Draining: its sibling takes the client (the reply names it), else 508.
        if self.shared.is_draining() {
            return Err(self.redirect_code(client, false));
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
            if config.relay_v6.is_some() {
                want_v6 = true;
            } else {
                v6_refused = true;
            }
        }
        if use_token.is_none()
            && ((want_v4 && config.relay_v4.is_none()) || (want_v6 && config.relay_v6.is_none()))
        {
            return Err(440);
        }
        if reserve_next && !self.shared.may_reserve() {
            return Err(508);
        }
        // Shared relay ports where the allocation's semantics allow them and its tenant has
        // a port it may use (see `sharing`); otherwise dedicated ports.
        let relay_only_tenant = config
            .tenants
            .get(auth.tenant)
            .is_some_and(|t| t.policy.is_relay_only());
        let even_only = even.is_some();
        let shareable = self.sharing.enabled()
            && !tcp
            && !reserve_next
            && use_token.is_none()
            && !msg.has(attr::DONT_FRAGMENT)
            && !relay_only_tenant;
        let pick = |v6: bool, wanted: bool| {
            if wanted {
                self.sharing
                    .pick(v6, even_only, client.addr.ip(), auth.tenant)
                    .map(Some)
            } else {
                Some(None)
            }
        };
        let picked = match (shareable, pick(false, want_v4), pick(true, want_v6)) {
            (true, Some(v4), Some(v6)) => Some([v4, v6]),
            _ => None,
        };
        if shareable && picked.is_none() {
            self.stats.shared_port_fallbacks += 1;
        }
        let share = picked.is_some();
        // The ports: a reservation's, or a draw (none for shared ports).
        let draw = match use_token {
            _ if share => Draw::default(),
            Some(t) => {
                let r = self.shared.take_reservation(&t).ok_or(508u16)?;
                let drawn = Drawn {
                    lease: r.lease,
                    bind: r.bind,
                    advertised: r.advertised,
                };
                if r.bind.is_ipv4() {
                    (want_v4, want_v6) = (true, false);
                    Draw {
                        v4: Some(drawn),
                        ..Draw::default()
                    }
                } else {
                    (want_v4, want_v6) = (false, true);
                    Draw {
                        v6: Some(drawn),
                        ..Draw::default()
                    }
                }
            }
            None => {
                drop(config);
                let mut refused = Vec::new();
                self.draw(
                    want_v4,
                    want_v6,
                    tcp,
                    even.is_some(),
                    reserve_next,
                    &mut refused,
                )
                .ok_or(508u16)?
            }
        };
        let lifetime = self.lifetime(msg, auth.tenant);
        let config = self.shared.config();
        let tenant = config.tenants.get(auth.tenant).ok_or(403u16)?;
        let user = self
            .shared
            .quotas
            .acquire(auth.tenant, &tenant.quotas, &auth.user_id)
            .map_err(|e| match e {
                QuotaError::User | QuotaError::Tenant => 486u16,
                QuotaError::Total => 508,
                // At its redirect limit: a sibling with room takes the client, else 508.
                QuotaError::Busy => self.redirect_code(client, true),
            })?;
        let bandwidth = tenant.quotas.allocation_bandwidth;
        let q = &tenant.quotas;
        let limit = [q.allocation_bandwidth, q.user_bandwidth, q.tenant_bandwidth]
            .into_iter()
            .flatten()
            .min();
        let relay_only = tenant.policy.is_relay_only();
        drop(config);
        let new_token = reserve_next.then(|| {
            let mut t = [0u8; 8];
            self.rng.fill_bytes(&mut t);
            t
        });
        let session = relay_only.then(|| {
            use std::hash::BuildHasher;
            rustc_hash::FxBuildHasher.hash_one(&auth.username)
        });
        let mut relayed = RelayAddrs {
            v4: draw.v4.as_ref().map(|d| d.advertised),
            v6: draw.v6.as_ref().map(|d| d.advertised),
        };
        let mut bind_to = (
            draw.v4.as_ref().map(|d| d.bind),
            draw.v6.as_ref().map(|d| d.bind),
        );
        let mut shared = [None; 2];
        // Nothing can fail from here on, so the ports' counts stay right.
        for (v6, index) in [false, true].into_iter().zip(picked.unwrap_or_default()) {
            let Some(index) = index else {
                continue;
            };
            let (id, bind, advertised) =
                self.sharing.take(v6, index, client.addr.ip(), auth.tenant);
            shared[usize::from(v6)] = Some(id);
            if v6 {
                (relayed.v6, bind_to.1) = (Some(advertised), Some(bind));
            } else {
                (relayed.v4, bind_to.0) = (Some(advertised), Some(bind));
            }
        }
        let dont_fragment = msg.has(attr::DONT_FRAGMENT);
        let allocation = Allocation {
            client,
            tenant: auth.tenant,
            username: auth.username.clone(),
            user_id: auth.user_id.clone(),
            user,
            relayed,
            expires: now + Duration::from_secs(u64::from(lifetime)),
            permissions: Vec::new(),
            channels: Vec::new(),
            bucket: if tcp {
                None
            } else {
                bandwidth.map(TokenBucket::new)
            },
            tcp,
            tcp_bucket: if tcp {
                bandwidth.map(|b| std::sync::Arc::new(AtomicBucket::new(b)))
            } else {
                None
            },
            tcp_usage: Default::default(),
            session,
            leases: [draw.v4, draw.v6]
                .into_iter()
                .flatten()
                .map(|d| d.lease)
                .collect(),
            binding: Some(Box::new(Binding {
                tid: msg.transaction_id(),
                auth: auth.clone(),
                lifetime,
                v6_refused,
                want_v4,
                want_v6,
                even: even.is_some(),
                new_token,
                next: draw.next,
                reserved: use_token.is_some(),
                dont_fragment,
                refused: Vec::new(),
                tries: 1,
                bandwidth: limit,
            })),
            shared,
            endpoints: Vec::new(),
            usage: Usage::default(),
            peers: 0,
            started: now,
            started_unix: unix,
        };
        let alloc = self.insert(allocation);
        self.timers
            .allocation(alloc, now + Duration::from_secs(u64::from(lifetime)));
        Ok(RelayBind {
            alloc,
            v4: bind_to.0,
            v6: bind_to.1,
            tcp,
            dont_fragment,
            shared: share,
        })
    }

    /// 300 when a sibling takes this client (while draining, or at the redirect limit when
    /// `full`) over its transport and address family; else 508.
    fn redirect_code(&self, client: ClientId, full: bool) -> u16 {
        let r = self.shared.redirect();
        let to = if full { &r.full } else { &r.draining };
        let tls = self.tls.contains(&client);
        match to
            .as_ref()
            .and_then(|a| a.for_client(client.is_stream(), tls, client.addr.is_ipv6()))
        {
            Some(_) => 300,
            None => 508,
        }
    }

    /// Draws relay ports from the registry for each family wanted (even ones for EVEN-PORT,
    /// and with `reserve_next` the next port too); ports the registry gives that do not suit
    /// go to `refused`, held by the caller so they are not drawn again.
    fn draw(
        &mut self,
        want_v4: bool,
        want_v6: bool,
        tcp: bool,
        even: bool,
        reserve_next: bool,
        refused: &mut Vec<PortLease>,
    ) -> Option<Draw> {
        let config = self.shared.config();
        let transport = if tcp {
            RelayTransport::Tcp
        } else {
            RelayTransport::Udp
        };
        let ports = std::sync::Arc::clone(&self.shared.ports);
        let mut one = |relay: Option<super::RelayAddress>, rng: &mut dyn RngCore| {
            let relay = relay?;
            for _ in 0..BIND_ATTEMPTS {
                let lease = ports.take(transport, relay.bind, even, rng)?;
                let port = lease.port();
                let next = if reserve_next {
                    let next = port
                        .checked_add(1)
                        .and_then(|n| ports.take_port(transport, relay.bind, n));
                    match next {
                        Some(n) => Some(n),
                        None => {
                            refused.push(lease);
                            continue;
                        }
                    }
                } else {
                    None
                };
                let drawn = |lease: PortLease| {
                    let port = lease.port();
                    Drawn {
                        lease,
                        bind: SocketAddr::new(relay.bind, port),
                        advertised: SocketAddr::new(relay.advertised, port),
                    }
                };
                return Some((drawn(lease), next.map(drawn)));
            }
            None
        };
        let mut draw = Draw::default();
        if want_v4 {
            let (d, next) = one(config.relay_v4, &mut self.rng)?;
            draw.v4 = Some(d);
            draw.next = next;
        }
        if want_v6 {
            let (d, next) = one(config.relay_v6, &mut self.rng)?;
            draw.v6 = Some(d);
            draw.next = draw.next.or(next);
        }
        Some(draw)
    }

    fn insert(&mut self, allocation: Allocation) -> AllocId {
        let index = match self.free_slots.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot::default());
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.allocation = Some(allocation);
        AllocId {
            index,
            generation: slot.generation,
        }
    }

    /// The caller bound what [`RelayBind`] asked for (`Ok`), or could not. The answer to the
    /// Allocate is written into `out`, unless other ports are to be bound first
    /// ([`BindOutcome::Retry`]).
    pub fn relay_bound(
        &mut self,
        alloc: AllocId,
        result: Result<(), BindFailure>,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> BindOutcome {
        out.clear();
        let Some(a) = self.slot_mut(alloc) else {
            return BindOutcome::Answer;
        };
        let Some(mut binding) = a.binding.take() else {
            return BindOutcome::Answer;
        };
        match result {
            Ok(()) => self.activate(alloc, *binding, now, out),
            Err(BindFailure::InUse) if !binding.reserved && binding.tries < BIND_ATTEMPTS => {
                binding.tries += 1;
                let a = self.slot_mut(alloc).expect("looked up above");
                binding.refused.append(&mut a.leases);
                binding.refused.extend(binding.next.take().map(|d| d.lease));
                let tcp = a.tcp;
                let mut refused = std::mem::take(&mut binding.refused);
                let draw = self.draw(
                    binding.want_v4,
                    binding.want_v6,
                    tcp,
                    binding.even,
                    binding.new_token.is_some(),
                    &mut refused,
                );
                binding.refused = refused;
                let Some(draw) = draw else {
                    self.refuse(alloc, *binding, 508, now, out);
                    return BindOutcome::Answer;
                };
                let bind = RelayBind {
                    alloc,
                    v4: draw.v4.as_ref().map(|d| d.bind),
                    v6: draw.v6.as_ref().map(|d| d.bind),
                    tcp,
                    dont_fragment: binding.dont_fragment,
                    shared: false,
                };
                let a = self.slot_mut(alloc).expect("looked up above");
                a.relayed = RelayAddrs {
                    v4: draw.v4.as_ref().map(|d| d.advertised),
                    v6: draw.v6.as_ref().map(|d| d.advertised),
                };
                a.leases = [draw.v4, draw.v6]
                    .into_iter()
                    .flatten()
                    .map(|d| d.lease)
                    .collect();
                binding.next = draw.next;
                a.binding = Some(binding);
                BindOutcome::Retry(bind)
            }
            Err(BindFailure::InUse | BindFailure::Other) => {
                self.refuse(alloc, *binding, 508, now, out);
                BindOutcome::Answer
            }
            // RFC 8656 §7.2: DONT-FRAGMENT the relay cannot honour is an unknown
            // comprehension-required attribute.
            Err(BindFailure::DontFragment) => {
                self.refuse(alloc, *binding, 420, now, out);
                BindOutcome::Answer
            }
        }
    }

    /// The allocation's sockets are bound: it becomes live, and the success answer is written.
    fn activate(
        &mut self,
        alloc: AllocId,
        mut b: Binding,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> BindOutcome {
        if let (Some(token), Some(next)) = (b.new_token, b.next.take()) {
            if !self
                .shared
                .reserve(token, next.lease, next.bind, next.advertised, now)
            {
                self.refuse(alloc, b, 508, now, out);
                return BindOutcome::Answer;
            }
        }
        let Some(a) = self.slot_mut(alloc) else {
            return BindOutcome::Answer;
        };
        let (client, tenant, relayed, tcp, session) =
            (a.client, a.tenant, a.relayed, a.tcp, a.session);
        self.by_client.insert(client, alloc);
        if let Some(s) = session {
            self.shared.relayed_addrs().extend(
                [relayed.v4, relayed.v6]
                    .into_iter()
                    .flatten()
                    .map(|r| ((tcp, r), (tenant, s))),
            );
        }
        self.stats.tenant(tenant).allocations_created += 1;
        self.count(tenant, method::ALLOCATE, 0);
        let mut m = Builder::new(out, Class::Success, method::ALLOCATE, b.tid);
        if let Some(r) = relayed.v4 {
            m.xor_address(attr::XOR_RELAYED_ADDRESS, r);
        }
        if let Some(r) = relayed.v6 {
            m.xor_address(attr::XOR_RELAYED_ADDRESS, r);
        }
        m.u32(attr::LIFETIME, b.lifetime)
            .xor_address(attr::XOR_MAPPED_ADDRESS, client.addr);
        if let Some(t) = b.new_token {
            m.attr(attr::RESERVATION_TOKEN, &t);
        }
        if b.v6_refused {
            m.attr(attr::ADDRESS_ERROR_CODE, &ADDRESS_ERROR_V6);
        }
        if let Some(bps) = b.bandwidth {
            m.u32(
                attr::BANDWIDTH,
                u32::try_from(bps >> 7).unwrap_or(u32::MAX).max(1),
            );
        }
        sign(&mut m, &self.shared, &b.auth);
        self.responses.store(client, b.tid, out, now);
        self.timers.allocation(alloc, now + PERMISSION_LIFETIME);
        BindOutcome::Answer
    }

    /// An Allocate that cannot be carried out after all: the slot goes back, the quota is
    /// released, and a signed error (420 names DONT-FRAGMENT) is written.
    fn refuse(&mut self, alloc: AllocId, b: Binding, code: u16, now: Instant, out: &mut Vec<u8>) {
        let Some(a) = self.take_slot(alloc) else {
            return;
        };
        self.shared.quotas.release(a.tenant, &a.user_id, &a.user);
        self.count(b.auth.tenant, method::ALLOCATE, code);
        let mut m = Builder::new(out, Class::Error, method::ALLOCATE, b.tid);
        m.error(code, reason(code));
        if code == 420 {
            m.unknown_attributes(&[attr::DONT_FRAGMENT]);
        }
        sign(&mut m, &self.shared, &b.auth);
        self.responses.store(a.client, b.tid, out, now);
    }

    /// Empties the slot of `alloc` for reuse under the next generation.
    fn take_slot(&mut self, alloc: AllocId) -> Option<Allocation> {
        let slot = self
            .slots
            .get_mut(alloc.index as usize)
            .filter(|s| s.generation == alloc.generation)?;
        let a = slot.allocation.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free_slots.push(alloc.index);
        self.release_shared(alloc, &a);
        Some(a)
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

    pub(super) fn refresh(
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
            self.free_for(id, EndReason::Released);
            return Ok(0);
        }
        let tenant = self.slot(id).map_or(0, |a| a.tenant);
        let lifetime = self.lifetime(msg, tenant);
        if let Some(a) = self.slot_mut(id) {
            a.expires = now + Duration::from_secs(u64::from(lifetime));
        }
        Ok(lifetime)
    }

    /// Checks a peer from XOR-PEER-ADDRESS: the normalized address, or the error code.
    pub(super) fn check_peer(
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

    /// CreatePermission (RFC 8656 §10): permissions for the IPs of every XOR-PEER-ADDRESS, all
    /// or none; on shared ports the allocation holds each exact endpoint named too.
    pub(super) fn create_permission(
        &mut self,
        msg: &Message<'_>,
        existing: Option<AllocId>,
        now: Instant,
    ) -> Result<(), u16> {
        let Some(id) = existing else {
            return Err(437);
        };
        let mut peers = [SocketAddr::from(([0, 0, 0, 0], 0)); 16];
        let mut n = 0;
        let values: Vec<&[u8]> = msg.get_all(attr::XOR_PEER_ADDRESS).collect();
        if values.is_empty() || values.len() > peers.len() {
            return Err(400);
        }
        for v in values {
            peers[n] = self.check_peer(msg, v, id)?;
            n += 1;
        }
        let peers = &peers[..n];
        let max = self.shared.config().max_permissions;
        self.prune_permissions(id, now);
        let a = self.slot(id).ok_or(437u16)?;
        let mut ips: Vec<IpAddr> = peers.iter().map(|p| p.ip()).collect();
        ips.sort_unstable();
        ips.dedup();
        let new = ips
            .iter()
            .filter(|ip| !a.permissions.iter().any(|(p, _)| p == *ip))
            .count();
        if a.permissions.len() + new > max {
            return Err(508);
        }
        self.may_hold(id, peers, now)
            .map_err(|r| self.count_refusal(r))?;
        let a = self.slot_mut(id).ok_or(437u16)?;
        for ip in ips {
            install_permission(a, ip, now + PERMISSION_LIFETIME);
        }
        self.hold(id, peers);
        Ok(())
    }

    /// ChannelBind (RFC 8656 §11): binds or refreshes a channel and its peer's permission,
    /// both or neither; on shared ports the allocation holds the peer endpoint too. Every
    /// check on the allocation's own state comes before the one on other holders.
    pub(super) fn channel_bind(
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
        self.prune_permissions(id, now);
        let a = self.slot(id).ok_or(437u16)?;
        // RFC 8656 §11.2: a channel stays tied to its peer, and a peer to its channel.
        if a.channels
            .iter()
            .any(|c| (c.number == number) != (c.peer == peer))
        {
            return Err(400);
        }
        let new_channel = !a.channels.iter().any(|c| c.number == number);
        let new_permission = !a.permissions.iter().any(|(ip, _)| *ip == peer.ip());
        if (new_channel && a.channels.len() >= max)
            || (new_permission && a.permissions.len() >= max)
        {
            return Err(508);
        }
        self.may_hold(id, &[peer], now)
            .map_err(|r| self.count_refusal(r))?;
        let a = self.slot_mut(id).ok_or(437u16)?;
        install_permission(a, peer.ip(), now + PERMISSION_LIFETIME);
        let expires = now + CHANNEL_LIFETIME;
        match a.channels.iter_mut().find(|c| c.number == number) {
            Some(c) => c.expires = expires,
            None => a.channels.push(Channel {
                number,
                peer,
                expires,
            }),
        }
        self.hold(id, &[peer]);
        Ok(())
    }

    /// Counts a shared-port refusal; its error code.
    fn count_refusal(&mut self, r: super::sharing::Refusal) -> u16 {
        match r {
            super::sharing::Refusal::Held => self.stats.shared_port_conflicts += 1,
            super::sharing::Refusal::Full => self.stats.shared_port_endpoint_limit += 1,
        }
        r.code()
    }

    /// Ends an allocation: its quota and ports go back, its RFC 6062 connections close, and
    /// the caller is told to close its sockets ([`Event::Freed`]).
    pub(super) fn free(&mut self, id: AllocId) {
        self.free_for(id, EndReason::Expired);
    }

    /// Ends an allocation and queues its session record.
    pub(super) fn free_for(&mut self, id: AllocId, reason: EndReason) {
        let Some(a) = self.take_slot(id) else {
            return;
        };
        let session = a.binding.is_none().then(|| {
            let end = self.last_now.unwrap_or(a.started);
            Box::new(Session {
                tenant: a.tenant,
                user_id: a.user_id.clone(),
                client: a.client,
                tcp: a.tcp,
                tls: self.tls.contains(&a.client),
                started_unix: a.started_unix,
                duration: end.saturating_duration_since(a.started),
                usage: a.total_usage(),
                peers: a.peers,
                reason,
            })
        });
        if a.binding.is_none() {
            self.by_client.remove(&a.client);
        }
        self.shared.quotas.release(a.tenant, &a.user_id, &a.user);
        if a.session.is_some() {
            let mut relayed = self.shared.relayed_addrs();
            for r in [a.relayed.v4, a.relayed.v6].into_iter().flatten() {
                relayed.remove(&(a.tcp, r));
            }
        }
        self.forget_tcp_connections(id);
        self.events.push_back(Event::Freed(id));
        if let Some(s) = session {
            self.events.push_back(Event::Ended(s));
        }
    }
}

impl Core {
    /// Drops the allocation's expired permissions and, on shared ports, the endpoints it held
    /// on their IPs: work in proportion to its own permissions and endpoints.
    pub(super) fn prune_permissions(&mut self, id: AllocId, now: Instant) {
        let Some(a) = live_mut(&mut self.slots, id) else {
            return;
        };
        if a.shared == [None; 2] {
            a.permissions.retain(|(_, exp)| *exp > now);
            return;
        }
        let sharing = &mut self.sharing;
        let (shared, endpoints) = (a.shared, &mut a.endpoints);
        a.permissions.retain(|(ip, exp)| {
            let keep = *exp > now;
            if let (false, Some(port)) = (keep, shared[usize::from(ip.is_ipv6())]) {
                sharing.drop_ip(id, port, *ip, endpoints);
            }
            keep
        });
    }
}

/// ADDITIONAL-ADDRESS-FAMILY, under its RFC 8656 code or the draft code older coturn
/// clients send.
fn additional_family<'m>(msg: &Message<'m>) -> Option<&'m [u8]> {
    msg.get(attr::ADDITIONAL_ADDRESS_FAMILY)
        .or_else(|| msg.get(attr::ADDITIONAL_ADDRESS_FAMILY_DRAFT))
}

/// Installs or refreshes the permission for `ip` until `expires`; the caller pruned the
/// expired ones and checked that a new one fits.
fn install_permission(a: &mut Allocation, ip: IpAddr, expires: Instant) {
    if let Some(p) = a.permissions.iter_mut().find(|(p, _)| *p == ip) {
        p.1 = expires;
        return;
    }
    a.permissions.push((ip, expires));
    a.peers = a.peers.saturating_add(1);
}

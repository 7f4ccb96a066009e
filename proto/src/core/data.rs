//! The hot path: ChannelData and Send indications from clients, datagrams from peers. Each is
//! one hash lookup (or an index, for peers) and a scan of the allocation's few channels or
//! permissions, with no lock, no allocation and no copy; bandwidth quotas are token buckets.

use std::net::SocketAddr;
use std::time::Instant;

use rand::RngCore;

use crate::policy::{normalize, Denied};
use crate::ports::RelayTransport;
use crate::stun::{
    self, attr, channel_data_header, method, Builder, Class, Message, TransactionId,
};
use crate::tenant::{Tenant, Tenants};

use super::{live_mut, AllocId, Allocation, ClientAction, ClientId, Core, PeerAction, Shared};

impl Core {
    #[inline]
    pub(super) fn client_channel_data(
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
        let Some(a) = live_mut(&mut self.slots, id) else {
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
        // On a shared port, only to an endpoint the allocation holds now (`sharing`).
        if let Some(port) = a.shared_port(peer) {
            if !self.hold_to_send(id, port, peer, now) {
                return ClientAction::None;
            }
        }
        let Some(a) = live_mut(&mut self.slots, id) else {
            return ClientAction::None;
        };
        let counters = self.stats.tenant(a.tenant);
        if !within_bandwidth(a, &self.shared, now, len) {
            counters.quota_dropped += 1;
            return ClientAction::None;
        }
        counters.relayed_packets[0] += 1;
        counters.relayed_bytes[0] += len as u64;
        a.usage.packets[0] += 1;
        a.usage.bytes[0] += len as u64;
        ClientAction::Relay {
            alloc: id,
            peer,
            start: 4,
            end: 4 + len,
        }
    }

    pub(super) fn send_indication(
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
        let shared = std::sync::Arc::clone(&self.shared);
        let Some(a) = live_mut(&mut self.slots, id) else {
            return ClientAction::None;
        };
        // Permissions are per IP, so the port-level rules (own relayed address, the relay's
        // listening ports and host services) are checked on every Send indication too.
        let own = [a.relayed.v4, a.relayed.v6];
        if !a.has_permission(peer.ip(), now)
            || !a.family_ok(peer)
            || own.contains(&Some(peer))
            || !peer_allowed(&shared, &shared.config().tenants, a, peer)
        {
            self.stats.dropped_packets += 1;
            return ClientAction::None;
        }
        // On a shared port, only to an endpoint the allocation holds, or may hold from now
        // on (`sharing`).
        if let Some(port) = a.shared_port(peer) {
            if !self.hold_to_send(id, port, peer, now) {
                return ClientAction::None;
            }
        }
        let Some(a) = live_mut(&mut self.slots, id) else {
            return ClientAction::None;
        };
        if !within_bandwidth(a, &shared, now, data.len()) {
            let tenant = a.tenant;
            self.stats.tenant(tenant).quota_dropped += 1;
            return ClientAction::None;
        }
        let tenant = a.tenant;
        a.usage.packets[0] += 1;
        a.usage.bytes[0] += data.len() as u64;
        let counters = self.stats.tenant(tenant);
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
    /// `buf[4..4 + len]`; the four bytes in front are room for a ChannelData header. A Data
    /// indication, where the peer has no channel, is written into `out`.
    #[inline]
    pub fn handle_peer(
        &mut self,
        alloc: AllocId,
        peer: SocketAddr,
        buf: &mut [u8],
        len: usize,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> PeerAction {
        let Some(slot) = self.slots.get_mut(alloc.index as usize) else {
            return PeerAction::Drop;
        };
        let (true, Some(a)) = (
            slot.generation == alloc.generation,
            slot.allocation.as_mut(),
        ) else {
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
        if !within_bandwidth(a, &self.shared, now, len) {
            counters.quota_dropped += 1;
            return PeerAction::Drop;
        }
        counters.relayed_packets[1] += 1;
        counters.relayed_bytes[1] += len as u64;
        a.usage.packets[1] += 1;
        a.usage.bytes[1] += len as u64;
        if let Some(number) = channel {
            buf[0..2].copy_from_slice(&number.to_be_bytes());
            buf[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            return PeerAction::ChannelData { client, len };
        }
        let mut tid = [0u8; 16];
        tid[..4].copy_from_slice(&stun::MAGIC_COOKIE.to_be_bytes());
        self.rng.fill_bytes(&mut tid[4..]);
        Builder::new(out, Class::Indication, method::DATA, TransactionId(tid))
            .xor_address(attr::XOR_PEER_ADDRESS, peer)
            .attr(attr::DATA, &buf[4..4 + len]);
        PeerAction::DataIndication { client }
    }
}

/// Takes `len` bytes from the allocation's and its user's (and tenant's) buckets; false: drop
/// the packet, which then costs none of them anything.
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
    if let Some(b) = a.bucket.as_mut() {
        b.refund(len);
    }
    false
}

/// Whether allocation `a`'s tenant policy lets it reach `peer`; a tenant removed by a reload
/// reaches nothing, and a relay-only tenant's allocation reaches only its own session's
/// other allocations.
pub(super) fn peer_allowed(
    shared: &Shared,
    tenants: &Tenants,
    a: &Allocation,
    peer: SocketAddr,
) -> bool {
    tenants.get(a.tenant).is_some_and(|t: &Tenant| {
        let allowed = match t.policy.check(peer) {
            Ok(()) => true,
            // A relay on loopback (tried on one machine): another of its allocations, by a
            // port it holds for one now.
            Err(Denied::Default) => {
                t.policy.may_be_allocation(peer)
                    && shared.ports.is_taken(
                        if a.tcp {
                            RelayTransport::Tcp
                        } else {
                            RelayTransport::Udp
                        },
                        peer.ip(),
                        peer.port(),
                    )
            }
            Err(_) => false,
        };
        allowed
            && (!t.policy.is_relay_only()
                || a.session.is_some_and(|s| {
                    shared.relayed_addrs().get(&(a.tcp, peer)) == Some(&(a.tenant, s))
                }))
    })
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

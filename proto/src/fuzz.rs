//! Entry points for the fuzz targets in `proto/fuzz/` (feature `fuzzing`), kept here so the
//! unit tests run them too (on pseudo-random input) and they cannot rot.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::Credentials;
use crate::core::{
    AllocId, BindFailure, BindOutcome, ClientAction, ClientId, Core, CoreConfig, PeerAction,
    RelayAddress, Shared,
};
use crate::policy::PeerPolicy;
use crate::quota::QuotaState;
use crate::stun::{attr, method, Builder, Class, Message, TransactionId};
use crate::tenant::{Tenant, Tenants, DEFAULT_TENANT};
use std::collections::{HashMap, HashSet};

/// Parses a datagram and reads every attribute the server reads.
pub fn decode(data: &[u8]) {
    let Ok(msg) = Message::parse(data) else {
        return;
    };
    for t in msg.attribute_types() {
        if let Some(v) = msg.get(t) {
            let _ = msg.xor_address(v);
            let _ = crate::stun::decode_address(v, None);
        }
    }
    let _ = msg.get_u32(attr::LIFETIME);
    let _ = msg.check_integrity_sha1(b"key");
    let _ = msg.check_integrity_sha256(b"key");
}

/// Drives one core with a byte script. Each step is an operation: a raw datagram from a
/// client or a peer, or a well-formed request the harness builds and signs (Allocate with
/// family and EVEN-PORT options, Refresh, CreatePermission, ChannelBind, Send, ChannelData),
/// since a fuzzer cannot forge MESSAGE-INTEGRITY by itself. Allocations the core asks for are
/// granted or refused by the script too.
/// `start` is the virtual clock's origin; the script advances it.
pub fn core(data: &[u8], start: Instant) -> crate::TenantStats {
    let policy = || PeerPolicy::new(vec!["127.0.0.0/8".parse().expect("net")], vec![]);
    let config = CoreConfig {
        // Two tenants, so that shared ports are divided between them.
        tenants: Tenants::new(
            REALM,
            vec![
                Tenant::new(
                    DEFAULT_TENANT,
                    Credentials::new(REALM, [("u", "p")], ["s".to_owned()]),
                    policy(),
                ),
                Tenant::new(
                    "other",
                    Credentials::new(OTHER_REALM, [("v", "q")], []),
                    policy(),
                ),
            ],
        ),
        default_lifetime: 600,
        max_lifetime: 3600,
        nonce_lifetime: 600,
        max_permissions: 8,
        max_peer_endpoints: 3,
        max_tcp_connections: 8,
        relay_v4: Some(RelayAddress {
            bind: [127, 0, 0, 1].into(),
            advertised: [127, 0, 0, 1].into(),
        }),
        relay_v6: Some(RelayAddress {
            bind: std::net::Ipv6Addr::LOCALHOST.into(),
            advertised: std::net::Ipv6Addr::LOCALHOST.into(),
        }),
        software: None,
        software_unauthenticated: false,
        unauthenticated_replies_per_sec: 1000.0,
        relay_ports: (49152, 65535),
    };
    let shared = Arc::new(Shared::new(config, QuotaState::new(None), [0; 32], start));
    let unix_at = |now: Instant| 1_800_000_000 + (now - start).as_secs();
    let mut now = start;
    let mut core = Core::new(Arc::clone(&shared), [0; 32]);
    // The first byte's low bit: relay through two shared ports per family.
    let (mode, data) = data.split_first().map_or((0, data), |(m, d)| (*m, d));
    let mut shared_ports = Vec::new();
    if mode & 1 == 1 {
        for ip in [
            std::net::IpAddr::from([127, 0, 0, 1]),
            std::net::Ipv6Addr::LOCALHOST.into(),
        ] {
            for port in [50_000, 50_001] {
                let lease = shared
                    .ports
                    .take_port(crate::ports::RelayTransport::Udp, ip, port)
                    .expect("a free port");
                let addr = SocketAddr::new(ip, port);
                shared_ports.push(core.add_shared_port(lease, addr, addr));
            }
        }
    }
    let keys = [
        crate::auth::long_term_key("u", REALM, "p"),
        crate::auth::long_term_key("v", OTHER_REALM, "q"),
    ];
    // What each client named (its allocation's peer endpoints, by CreatePermission,
    // ChannelBind or Send): on shared ports, nothing else may reach it.
    let mut named: HashMap<ClientId, HashSet<SocketAddr>> = HashMap::new();
    let mut bytes = data.iter().copied();
    let mut next = move || bytes.next();
    let mut buf = vec![0u8; 4 + 2048];
    let mut packet = Vec::new();
    let mut out = Vec::new();
    let mut allocations: Vec<AllocId> = Vec::new();
    let mut tid_counter = 0u32;
    let mut connections: Vec<u32> = Vec::new();
    while let (Some(op), Some(arg)) = (next(), next()) {
        now += Duration::from_millis(u64::from(op >> 5) * 7_000);
        let client = ClientId {
            listener: if arg & 0x20 == 0 {
                0
            } else {
                crate::STREAM_BASE + u32::from(op & 1)
            },
            addr: SocketAddr::from(([127, 0, 0, 1], 40_000 + u16::from(arg & 3))),
        };
        let peer = SocketAddr::from((
            [127, 0, 0, 1 + (arg >> 6)],
            7_000 + u16::from((arg >> 2) & 3),
        ));
        tid_counter += 1;
        let mut tid = [0u8; 16];
        tid[..4].copy_from_slice(&crate::stun::MAGIC_COOKIE.to_be_bytes());
        tid[4..8].copy_from_slice(&tid_counter.to_be_bytes());
        let tid = TransactionId(tid);
        let mut nonce = [0u8; 37];
        let nonce = shared
            .nonces
            .issue(client.addr, unix_at(now), &mut nonce)
            .to_vec();
        // Bit 0x10 of `arg`: the second tenant's user signs.
        let (user, realm, key): (&[u8], &str, &[u8]) = if arg & 0x10 == 0 {
            (b"u", REALM, &keys[0])
        } else {
            (b"v", OTHER_REALM, &keys[1])
        };
        let signed = |packet: &mut Vec<u8>, m: u16, extra: &dyn Fn(&mut Builder<'_>)| {
            let mut b = Builder::new(packet, Class::Request, m, tid);
            extra(&mut b);
            b.attr(attr::USERNAME, user)
                .attr(attr::REALM, realm.as_bytes())
                .attr(attr::NONCE, &nonce)
                .integrity_sha1(key);
        };
        let flags = next().unwrap_or(0);
        match op & 0x0f {
            0 | 8 => {
                let len = usize::from(flags);
                packet.clear();
                packet.extend((0..len).map_while(|_| next()));
            }
            1 => signed(&mut packet, method::ALLOCATE, &|b| {
                b.u32(
                    attr::REQUESTED_TRANSPORT,
                    if flags & 1 == 0 { 17 << 24 } else { 6 << 24 },
                );
                if flags & 2 != 0 {
                    b.u32(
                        attr::REQUESTED_ADDRESS_FAMILY,
                        u32::from(1 + (flags >> 7)) << 24,
                    );
                }
                if flags & 4 != 0 {
                    b.u32(attr::ADDITIONAL_ADDRESS_FAMILY, 2 << 24);
                }
                if flags & 8 != 0 {
                    b.u32(attr::EVEN_PORT, u32::from(flags & 0x10) << 27);
                }
                if flags & 0x20 != 0 {
                    b.attr(attr::RESERVATION_TOKEN, &[flags; 8]);
                }
                if flags & 0x40 != 0 {
                    b.u32(attr::LIFETIME, u32::from(flags) * 40);
                }
            }),
            9 => signed(&mut packet, method::CONNECT, &|b| {
                b.xor_address(attr::XOR_PEER_ADDRESS, peer);
            }),
            10 => {
                let id = connections
                    .get(usize::from(flags) % connections.len().max(1))
                    .copied()
                    .unwrap_or(7);
                signed(&mut packet, method::CONNECTION_BIND, &|b| {
                    b.u32(attr::CONNECTION_ID, id);
                })
            }
            11 => {
                let alloc = allocations.get(usize::from(arg >> 4)).copied();
                if let Some((_, id)) =
                    alloc.and_then(|a| core.peer_connected(a, peer, now, &mut out))
                {
                    connections.push(id);
                }
                continue;
            }
            2 => signed(&mut packet, method::REFRESH, &|b| {
                b.u32(attr::LIFETIME, u32::from(flags) * 20);
            }),
            3 => {
                // Bit 2: a second endpoint of the peer's IP.
                let second = SocketAddr::new(peer.ip(), peer.port() ^ 1);
                signed(&mut packet, method::CREATE_PERMISSION, &|b| {
                    b.xor_address(attr::XOR_PEER_ADDRESS, peer);
                    if flags & 1 != 0 {
                        b.xor_address(attr::XOR_PEER_ADDRESS, SocketAddr::from(([10, 0, 0, 1], 9)));
                    }
                    if flags & 4 != 0 {
                        b.xor_address(attr::XOR_PEER_ADDRESS, second);
                    }
                });
                named.entry(client).or_default().extend([peer, second]);
            }
            4 => {
                signed(&mut packet, method::CHANNEL_BIND, &|b| {
                    b.u32(attr::CHANNEL_NUMBER, (0x3ff0 + u32::from(flags)) << 16)
                        .xor_address(attr::XOR_PEER_ADDRESS, peer);
                });
                named.entry(client).or_default().insert(peer);
            }
            5 => {
                Builder::new(&mut packet, Class::Indication, method::SEND, tid)
                    .xor_address(attr::XOR_PEER_ADDRESS, peer)
                    .attr(attr::DATA, &[flags; 40]);
                named.entry(client).or_default().insert(peer);
            }
            6 => {
                packet.clear();
                packet.extend_from_slice(&(0x4000 + u16::from(flags & 0x1f)).to_be_bytes());
                packet.extend_from_slice(&u16::from(flags >> 3).to_be_bytes());
                packet.resize(4 + usize::from(flags >> 3), 0xab);
            }
            _ => {
                let len = usize::from(flags);
                buf[4..4 + len].fill(op);
                if let Some(&port) = shared_ports.get(usize::from(arg >> 4)) {
                    let action = core.handle_shared_peer(port, peer, &mut buf, len, now, &mut out);
                    // A shared port delivers only to a client that named the endpoint.
                    if let PeerAction::ChannelData { client, .. }
                    | PeerAction::DataIndication { client } = action
                    {
                        assert!(
                            named.get(&client).is_some_and(|n| n.contains(&peer)),
                            "{peer} reached {client:?}, which never named it"
                        );
                    }
                } else if let Some(alloc) = allocations.get(usize::from(arg >> 4)) {
                    let _ = core.handle_peer(*alloc, peer, &mut buf, len, now, &mut out);
                }
                core.handle_timeout(now);
                while core.poll_event().is_some() {}
                continue;
            }
        }
        let action = core.handle_client(&packet, client, now, unix_at(now), &mut out);
        // What a shared port sends goes only to an endpoint its allocation holds now.
        if let ClientAction::Relay { alloc, peer, .. } = action {
            if core.relays_shared(alloc, peer) {
                assert!(
                    core.held_endpoints(alloc, now).contains(&peer),
                    "{peer} sent to without holding it"
                );
            }
        }
        if let ClientAction::DataConnection { connection, .. } = action {
            if flags & 2 != 0 {
                shared.connection_ended(connection);
            }
        }
        if let ClientAction::Connect { connection, .. } = action {
            connections.push(connection);
            let _ = core.connect_done(connection, flags & 1 == 0, now, &mut out);
        }
        if let ClientAction::Allocate(mut bind) = action {
            // The script says how binding goes: bound, a port in use (the core draws again,
            // a few times), DONT-FRAGMENT impossible, or another failure.
            let mut attempts = 0;
            loop {
                let result = match (op >> 4) & 3 {
                    0 => Ok(()),
                    1 if attempts < 2 => Err(BindFailure::InUse),
                    1 => Ok(()),
                    2 => Err(BindFailure::DontFragment),
                    _ => Err(BindFailure::Other),
                };
                attempts += 1;
                match core.relay_bound(bind.alloc, result, now, &mut out) {
                    BindOutcome::Retry(again) => bind = again,
                    BindOutcome::Answer => break,
                }
            }
            if core.relayed(bind.alloc).is_some() {
                allocations.push(bind.alloc);
                // A new allocation has named nothing yet.
                named.remove(&client);
            }
        }
        core.handle_timeout(now);
        while core.poll_event().is_some() {}
        core.check_sharing();
    }
    core.take_stats().total()
}

const REALM: &str = "fuzz";
const OTHER_REALM: &str = "fuzz-other";

#[cfg(test)]
mod tests {
    /// A random script of the operations that make traffic (Allocate with few options,
    /// CreatePermission, ChannelBind, Send, ChannelData, peer datagrams), for the unit test:
    /// random bytes alone rarely get past Allocate, which the coverage-guided fuzzer does.
    fn script(next: &mut impl FnMut() -> u64) -> Vec<u8> {
        let mut data = vec![next() as u8];
        for _ in 0..(next() % 60) {
            let op = [1u8, 1, 3, 4, 5, 5, 6, 7, 7, 7, 2][(next() % 11) as usize];
            // Rarely a step of the clock (7 s a unit, in the op's top bits).
            let time = if next() % 8 == 0 {
                (next() as u8) & 0xe0
            } else {
                0
            };
            let arg = next() as u8 & 0x5f;
            let flags = match op {
                1 => 0,
                2 => 30,
                _ => next() as u8 & 0x3f,
            };
            data.extend([op | time, arg, flags]);
            if op == 6 {
                data.pop();
                data.push(flags & 0x1f);
            }
        }
        data
    }

    #[test]
    fn fuzz_entry_points_survive_random_input() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let (mut allocations, mut relayed) = (0, [[0; 2]; 2]);
        for round in 0..3000 {
            let data: Vec<u8> = if round % 2 == 0 {
                (0..(next() % 600)).map(|_| next() as u8).collect()
            } else {
                script(&mut next)
            };
            super::decode(&data);
            let stats = super::core(&data, std::time::Instant::now());
            allocations += stats.allocations_created;
            let mode = usize::from(data.first().is_some_and(|m| m & 1 == 1));
            for (sum, n) in relayed[mode].iter_mut().zip(stats.relayed_packets) {
                *sum += n;
            }
        }
        // Random scripts reach the relay path both ways on dedicated and shared ports (where
        // each delivery was checked against what its client named).
        assert!(
            allocations > 100 && relayed.iter().flatten().all(|n| *n > 50),
            "{allocations} allocations, {relayed:?} relayed"
        );
        // A script that allocates, permits a peer and sends to it, and the peer answers,
        // reaches the relay path both ways, on dedicated and (first byte 1) shared ports.
        // (The allocation's shared port is 50001, the odd one, at index 1.)
        for (mode, port) in [(0, 0), (1, 0x10)] {
            let data = [mode, 1, 0, 0, 3, 0, 0, 5, 0, 0, 7, port, 4];
            let stats = super::core(&data, std::time::Instant::now());
            assert_eq!(
                (stats.allocations_created, stats.relayed_packets),
                (1, [1, 1]),
                "mode {mode}"
            );
        }
    }
}

//! Shared relay ports: allocations told apart by peer address, conflicts, unclaimed peer
//! datagrams, and the allocations that keep dedicated ports.

use super::*;
use crate::ports::RelayTransport;

const SHARED: &str = "127.0.0.1:50000";

/// A harness whose core relays through the shared ports `ports` (on 127.0.0.1).
fn shared_harness(ports: &[u16]) -> Harness {
    let mut h = Harness::new();
    for &p in ports {
        let ip: IpAddr = "127.0.0.1".parse().expect("ip");
        let lease = h
            .core
            .shared()
            .ports
            .take_port(RelayTransport::Udp, ip, p)
            .expect("free port");
        let addr = SocketAddr::new(ip, p);
        h.core.add_shared_port(lease, addr, addr);
    }
    h
}

fn port0() -> SharedPortId {
    SharedPortId {
        v6: false,
        index: 0,
    }
}

fn channel_bind(c: &mut Client, h: &mut Harness, number: u16, peer: SocketAddr) -> Option<u16> {
    let req = c.request(method::CHANNEL_BIND, |b| {
        b.u32(attr::CHANNEL_NUMBER, u32::from(number) << 16)
            .xor_address(attr::XOR_PEER_ADDRESS, peer);
    });
    code(&h.send(&req, c.id).expect("reply"))
}

/// A datagram from `peer` to the shared port: who gets it.
fn from_peer(h: &mut Harness, peer: &str) -> PeerAction {
    let mut buf = [0u8; 32];
    buf[4..8].copy_from_slice(b"ping");
    h.core.handle_shared_peer(
        port0(),
        peer.parse().expect("a"),
        &mut buf,
        4,
        h.now,
        &mut h.out,
    )
}

#[test]
fn allocations_share_a_port_and_are_told_apart_by_peer_address() {
    let mut h = shared_harness(&[50000]);
    let mut a = client(40000, "alice", "wonderland");
    let mut b = client(40001, "bob", "builder");
    assert_eq!(relayed_of(&a.allocate(&mut h)).to_string(), SHARED);
    assert_eq!(relayed_of(&b.allocate(&mut h)).to_string(), SHARED);
    // The relay binds nothing for them: no port of the range is taken beyond the shared one.
    let ip = "127.0.0.1".parse().expect("ip");
    assert_eq!(h.core.shared().ports.in_use(RelayTransport::Udp, ip), 1);

    let pa: SocketAddr = "127.0.0.1:7000".parse().expect("a");
    let pb: SocketAddr = "127.0.0.1:7001".parse().expect("a");
    assert_eq!(channel_bind(&mut a, &mut h, 0x4001, pa), None);
    assert_eq!(channel_bind(&mut b, &mut h, 0x4001, pb), None);
    assert_eq!(
        from_peer(&mut h, "127.0.0.1:7000"),
        PeerAction::ChannelData {
            client: a.id,
            len: 4
        }
    );
    assert_eq!(
        from_peer(&mut h, "127.0.0.1:7001"),
        PeerAction::ChannelData {
            client: b.id,
            len: 4
        }
    );
    // Another port of that IP: both allocations have a permission for it, so neither gets it.
    assert_eq!(from_peer(&mut h, "127.0.0.1:7002"), PeerAction::Drop);
    // An IP no allocation permitted.
    assert_eq!(from_peer(&mut h, "127.0.0.9:7000"), PeerAction::Drop);
    assert_eq!(h.core.take_stats().shared_port_unmatched, 2);
}

#[test]
fn a_peer_address_held_on_the_port_is_refused_to_others_until_released() {
    let mut h = shared_harness(&[50000]);
    let mut a = client(40000, "alice", "wonderland");
    let mut b = client(40001, "bob", "builder");
    a.allocate(&mut h);
    b.allocate(&mut h);
    let peer: SocketAddr = "127.0.0.1:7000".parse().expect("a");
    assert_eq!(channel_bind(&mut a, &mut h, 0x4001, peer), None);

    // Bob wants the same peer address on the same port: 403, and his Send is dropped.
    assert_eq!(channel_bind(&mut b, &mut h, 0x4002, peer), Some(403));
    let req = b.request(method::CREATE_PERMISSION, peer_attr(peer));
    assert_eq!(code(&h.send(&req, b.id).expect("reply")), None);
    let ind = send_indication(peer, 1);
    assert!(matches!(
        h.core.handle_client(&ind, b.id, h.now, h.unix, &mut h.out),
        ClientAction::None
    ));
    // Alice's own Send to it goes.
    assert!(matches!(
        h.core.handle_client(&ind, a.id, h.now, h.unix, &mut h.out),
        ClientAction::Relay { peer: p, .. } if p == peer
    ));
    assert_eq!(h.core.take_stats().shared_port_conflicts, 2);
    assert_eq!(
        from_peer(&mut h, "127.0.0.1:7000"),
        PeerAction::ChannelData {
            client: a.id,
            len: 4
        }
    );

    // Alice's allocation ends: the address is free for Bob, and its datagrams reach him.
    let req = a.request(method::REFRESH, |m| {
        m.u32(attr::LIFETIME, 0);
    });
    assert_eq!(code(&h.send(&req, a.id).expect("reply")), None);
    assert_eq!(channel_bind(&mut b, &mut h, 0x4002, peer), None);
    assert_eq!(
        from_peer(&mut h, "127.0.0.1:7000"),
        PeerAction::ChannelData {
            client: b.id,
            len: 4
        }
    );
}

#[test]
fn unclaimed_peer_datagrams_reach_the_one_allocation_with_a_permission() {
    let mut h = shared_harness(&[50000]);
    let mut a = client(40000, "alice", "wonderland");
    let mut b = client(40001, "bob", "builder");
    a.allocate(&mut h);
    b.allocate(&mut h);
    let peer: SocketAddr = "127.0.0.2:9000".parse().expect("a");
    let req = a.request(method::CREATE_PERMISSION, peer_attr(peer));
    assert_eq!(code(&h.send(&req, a.id).expect("reply")), None);
    // An ICE check arriving before Alice sent anything: a Data indication for her, and the
    // peer address is hers from now on.
    assert_eq!(
        from_peer(&mut h, "127.0.0.2:9000"),
        PeerAction::DataIndication { client: a.id }
    );
    // Bob permits the same IP: Alice's flow, which only receives, stays hers...
    let req = b.request(method::CREATE_PERMISSION, peer_attr(peer));
    assert_eq!(code(&h.send(&req, b.id).expect("reply")), None);
    assert_eq!(
        from_peer(&mut h, "127.0.0.2:9000"),
        PeerAction::DataIndication { client: a.id }
    );
    // ...and Bob cannot take it over by sending to it.
    let ind = send_indication(peer, 2);
    assert!(matches!(
        h.core.handle_client(&ind, b.id, h.now, h.unix, &mut h.out),
        ClientAction::None
    ));
    assert_eq!(
        from_peer(&mut h, "127.0.0.2:9000"),
        PeerAction::DataIndication { client: a.id }
    );
    // Another port of that IP, which neither claimed, is nobody's while both may have it...
    assert_eq!(from_peer(&mut h, "127.0.0.2:9001"), PeerAction::Drop);
    let stats = h.core.take_stats();
    assert_eq!(
        (stats.shared_port_unmatched, stats.shared_port_conflicts),
        (1, 1)
    );
    // ...until one of them sends to it.
    let other: SocketAddr = "127.0.0.2:9001".parse().expect("a");
    assert!(matches!(
        h.core
            .handle_client(&send_indication(other, 3), b.id, h.now, h.unix, &mut h.out),
        ClientAction::Relay { .. }
    ));
    assert_eq!(
        from_peer(&mut h, "127.0.0.2:9001"),
        PeerAction::DataIndication { client: b.id }
    );
    // A claim lasts as long as its allocation's permission: once Alice's lapses, Bob may have
    // her peer address.
    h.advance(301);
    let req = b.request(method::CREATE_PERMISSION, peer_attr(peer));
    assert_eq!(code(&h.send(&req, b.id).expect("reply")), None);
    assert!(matches!(
        h.core.handle_client(&ind, b.id, h.now, h.unix, &mut h.out),
        ClientAction::Relay { .. }
    ));
    assert_eq!(
        from_peer(&mut h, "127.0.0.2:9000"),
        PeerAction::DataIndication { client: b.id }
    );
}

#[test]
fn allocations_spread_over_the_ports_and_even_port_keeps_a_dedicated_one() {
    let mut h = shared_harness(&[50000, 50001]);
    let mut ports = Vec::new();
    for i in 0..4 {
        let mut c = client(40000 + i, "alice", "wonderland");
        ports.push(relayed_of(&c.allocate(&mut h)).port());
    }
    // The odd port first on a tie, keeping the even one for EVEN-PORT.
    assert_eq!(ports, [50001, 50000, 50001, 50000]);

    // EVEN-PORT gets the even shared port; with its R bit (the next port reserved), and with
    // DONT-FRAGMENT, a port of its own.
    let mut d = client(41000, "bob", "builder");
    let reply = d.call(&mut h, method::ALLOCATE, |b| {
        b.u32(attr::REQUESTED_TRANSPORT, 17 << 24)
            .u32(attr::EVEN_PORT, 0);
    });
    assert_eq!(relayed_of(&reply).port(), 50000);
    let mut r = client(41002, "bob", "builder");
    let reply = r.call(&mut h, method::ALLOCATE, |b| {
        b.u32(attr::REQUESTED_TRANSPORT, 17 << 24)
            .u32(attr::EVEN_PORT, 0x8000_0000);
    });
    let even = relayed_of(&reply).port();
    assert!(even % 2 == 0 && even != 50000, "{even}");
    let mut e = client(41001, "bob", "builder");
    let reply = e.call(&mut h, method::ALLOCATE, |b| {
        b.u32(attr::REQUESTED_TRANSPORT, 17 << 24)
            .attr(attr::DONT_FRAGMENT, &[]);
    });
    assert!(![50000, 50001].contains(&relayed_of(&reply).port()));
}

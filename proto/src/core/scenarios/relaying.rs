//! Relaying: permissions, channels, Send and Data indications, the peer policy, bandwidth quotas, oversized datagrams.

use super::*;

#[test]
fn denied_peers_get_403_and_are_counted() {
    let mut h = Harness::with(Quotas::default(), false);
    let mut c = client(40000, "alice", "wonderland");
    c.allocate(&mut h);
    for peer in [
        "127.0.0.1:9",
        "10.0.0.1:9",
        "169.254.169.254:80",
        "[::ffff:192.168.0.1]:9",
    ] {
        let req = c.request(
            method::CREATE_PERMISSION,
            peer_attr(peer.parse().expect("a")),
        );
        assert_eq!(
            code(&h.send(&req, c.id).expect("reply")),
            Some(403),
            "{peer}"
        );
    }
    let req = c.request(method::CHANNEL_BIND, |b| {
        b.u32(attr::CHANNEL_NUMBER, 0x4000 << 16)
            .xor_address(attr::XOR_PEER_ADDRESS, "127.0.0.1:9".parse().expect("a"));
    });
    assert_eq!(code(&h.send(&req, c.id).expect("reply")), Some(403));
    let req = c.request(
        method::CREATE_PERMISSION,
        peer_attr("[2606:4700::1]:9".parse().expect("a")),
    );
    assert_eq!(code(&h.send(&req, c.id).expect("reply")), Some(443));
    let req = c.request(
        method::CREATE_PERMISSION,
        peer_attr("8.8.8.8:53".parse().expect("a")),
    );
    assert_eq!(code(&h.send(&req, c.id).expect("reply")), None);
    assert_eq!(h.core.take_stats().total().peer_denied, 5);
}

#[test]
fn channels_relay_both_ways_and_data_indications_without_a_channel() {
    let mut h = Harness::new();
    let mut c = client(40000, "alice", "wonderland");
    c.allocate(&mut h);
    let alloc = relayed_alloc(&h);
    let peer: SocketAddr = "127.0.0.1:7000".parse().expect("a");

    // Peer traffic without a permission is dropped.
    let mut buf = [0u8; 64];
    buf[4..9].copy_from_slice(b"hello");
    assert_eq!(
        h.core
            .handle_peer(alloc, peer, &mut buf, 5, h.now, &mut h.out),
        PeerAction::Drop
    );

    let req = c.request(method::CHANNEL_BIND, |b| {
        b.u32(attr::CHANNEL_NUMBER, 0x4001 << 16)
            .xor_address(attr::XOR_PEER_ADDRESS, peer);
    });
    assert_eq!(code(&h.send(&req, c.id).expect("reply")), None);

    let data = [0x40, 0x01, 0, 3, b'a', b'b', b'c', 0];
    match h.core.handle_client(&data, c.id, h.now, h.unix, &mut h.out) {
        ClientAction::Relay {
            alloc: a,
            peer: p,
            start,
            end,
        } => {
            assert_eq!((a, p, &data[start..end]), (alloc, peer, &b"abc"[..]));
        }
        other => panic!("expected relay, got {other:?}"),
    }
    assert_eq!(
        h.core
            .handle_peer(alloc, peer, &mut buf, 5, h.now, &mut h.out),
        PeerAction::ChannelData {
            client: c.id,
            len: 5
        }
    );
    assert_eq!(&buf[..9], &[0x40, 0x01, 0, 5, b'h', b'e', b'l', b'l', b'o']);

    // Another port of the same peer IP has the permission but no channel: Data indication.
    let other: SocketAddr = "127.0.0.1:7001".parse().expect("a");
    assert_eq!(
        h.core
            .handle_peer(alloc, other, &mut buf, 5, h.now, &mut h.out),
        PeerAction::DataIndication { client: c.id }
    );
    let ind = Message::parse(&h.out[..]).expect("indication parses");
    assert_eq!(
        (ind.class(), ind.method()),
        (Class::Indication, method::DATA)
    );
    assert_eq!(ind.get(attr::DATA), Some(&b"hello"[..]));
    assert_eq!(
        ind.xor_address(ind.get(attr::XOR_PEER_ADDRESS).expect("peer")),
        Some(other)
    );

    // Rebinding the channel to another peer is refused.
    let req = c.request(method::CHANNEL_BIND, |b| {
        b.u32(attr::CHANNEL_NUMBER, 0x4001 << 16)
            .xor_address(attr::XOR_PEER_ADDRESS, other);
    });
    assert_eq!(code(&h.send(&req, c.id).expect("reply")), Some(400));
    let req = c.request(method::CHANNEL_BIND, |b| {
        b.u32(attr::CHANNEL_NUMBER, 0x3FFF << 16)
            .xor_address(attr::XOR_PEER_ADDRESS, other);
    });
    assert_eq!(code(&h.send(&req, c.id).expect("reply")), Some(400));
}

#[test]
fn send_indications_need_a_permission_and_permissions_expire() {
    let mut h = Harness::new();
    let mut c = client(40000, "alice", "wonderland");
    c.allocate(&mut h);
    let alloc = relayed_alloc(&h);
    let peer: SocketAddr = "127.0.0.1:7000".parse().expect("a");
    let ind = send_indication(peer, 1);
    assert!(matches!(
        h.core.handle_client(&ind, c.id, h.now, h.unix, &mut h.out),
        ClientAction::None
    ));
    let req = c.request(method::CREATE_PERMISSION, peer_attr(peer));
    assert_eq!(code(&h.send(&req, c.id).expect("reply")), None);
    match h.core.handle_client(&ind, c.id, h.now, h.unix, &mut h.out) {
        ClientAction::Relay {
            peer: p,
            start,
            end,
            ..
        } => {
            assert_eq!((p, &ind[start..end]), (peer, &b"payload"[..]));
        }
        other => panic!("expected relay, got {other:?}"),
    }
    h.advance(299);
    assert!(matches!(
        h.core.handle_client(&ind, c.id, h.now, h.unix, &mut h.out),
        ClientAction::Relay { .. }
    ));
    h.advance(2);
    assert!(matches!(
        h.core.handle_client(&ind, c.id, h.now, h.unix, &mut h.out),
        ClientAction::None
    ));
    let mut buf = [0u8; 16];
    assert_eq!(
        h.core
            .handle_peer(alloc, peer, &mut buf, 4, h.now, &mut h.out),
        PeerAction::Drop
    );
}

#[test]
fn bandwidth_quota_drops_excess_packets() {
    let mut h = Harness::with(
        Quotas {
            allocation_bandwidth: Some(1000),
            ..Default::default()
        },
        true,
    );
    let mut c = client(40000, "alice", "wonderland");
    let ok = c.allocate(&mut h);
    // The limit is told in the answer, as coturn tells it: 1000 B/s in units of 128 B/s.
    let msg = stun::Message::parse(&ok).expect("parses");
    assert_eq!(msg.get_u32(attr::BANDWIDTH), Some(1000 >> 7));
    let peer: SocketAddr = "127.0.0.1:7000".parse().expect("a");
    let req = c.request(method::CHANNEL_BIND, |b| {
        b.u32(attr::CHANNEL_NUMBER, 0x4000 << 16)
            .xor_address(attr::XOR_PEER_ADDRESS, peer);
    });
    h.send(&req, c.id);
    let mut data = vec![0x40, 0x00, 0x01, 0xf4];
    data.resize(4 + 500, 7);
    let relayed = (0..5)
        .filter(|_| {
            matches!(
                h.core.handle_client(&data, c.id, h.now, h.unix, &mut h.out),
                ClientAction::Relay { .. }
            )
        })
        .count();
    assert_eq!(relayed, 2);
    h.now += Duration::from_millis(500);
    assert!(matches!(
        h.core.handle_client(&data, c.id, h.now, h.unix, &mut h.out),
        ClientAction::Relay { .. }
    ));
}

#[test]
fn own_relayed_address_is_refused_but_another_allocation_is_reachable() {
    let mut h = Harness::new();
    let mut a = client(40000, "alice", "wonderland");
    let a_relayed = relayed_of(&a.allocate(&mut h));
    let mut b = client(40001, "bob", "builder");
    let b_relayed = relayed_of(&b.allocate(&mut h));
    assert_eq!(
        code(&a.call(&mut h, method::CREATE_PERMISSION, peer_attr(a_relayed))),
        Some(403)
    );
    assert_eq!(
        code(&a.call(&mut h, method::CREATE_PERMISSION, peer_attr(b_relayed))),
        None
    );
}

#[test]
fn send_indications_to_the_relays_own_ports_are_dropped() {
    let mut h = Harness::new();
    let mut c = client(40000, "alice", "wonderland");
    c.allocate(&mut h);
    // A permission for the relay's IP (another allocation there is a fine peer)…
    let other: SocketAddr = "127.0.0.1:50002".parse().expect("a");
    assert_eq!(
        code(&c.call(&mut h, method::CREATE_PERMISSION, peer_attr(other))),
        None
    );
    // …does not open its listening port to Send indications.
    for (target, relayed) in [("127.0.0.1:3478", false), ("127.0.0.1:50002", true)] {
        let mut buf = Vec::new();
        let tid = c.tid();
        Builder::new(&mut buf, Class::Indication, method::SEND, tid)
            .xor_address(attr::XOR_PEER_ADDRESS, target.parse().expect("a"))
            .attr(attr::DATA, b"x");
        let action = h.core.handle_client(&buf, c.id, h.now, h.unix, &mut h.out);
        assert_eq!(
            matches!(action, ClientAction::Relay { .. }),
            relayed,
            "{target}"
        );
    }
}

#[test]
fn channel_bind_whose_permission_cannot_be_installed_binds_no_channel() {
    let mut h = Harness::new();
    let mut c = client(40000, "alice", "wonderland");
    c.allocate(&mut h);
    let alloc = relayed_alloc(&h);
    // max_permissions is 4: fill them with other IPs.
    for i in 2..6u8 {
        let peer = SocketAddr::from(([127, 0, 0, i], 7000));
        let reply = c.call(&mut h, method::CREATE_PERMISSION, peer_attr(peer));
        assert_eq!(code(&reply), None);
    }
    let peer: SocketAddr = "127.0.0.9:7000".parse().expect("a");
    let reply = c.call(&mut h, method::CHANNEL_BIND, |b| {
        b.u32(attr::CHANNEL_NUMBER, 0x4000 << 16)
            .xor_address(attr::XOR_PEER_ADDRESS, peer);
    });
    assert_eq!(code(&reply), Some(508));
    // Neither the channel nor the permission exists.
    let data = [0x40, 0x00, 0, 1, b'x', 0, 0, 0];
    assert!(matches!(
        h.core.handle_client(&data, c.id, h.now, h.unix, &mut h.out),
        ClientAction::None
    ));
    let mut buf = [0u8; 16];
    assert_eq!(
        h.core
            .handle_peer(alloc, peer, &mut buf, 1, h.now, &mut h.out),
        PeerAction::Drop
    );
    // Once a permission expires, the same ChannelBind works.
    h.advance(301);
    let reply = c.call(&mut h, method::CHANNEL_BIND, |b| {
        b.u32(attr::CHANNEL_NUMBER, 0x4000 << 16)
            .xor_address(attr::XOR_PEER_ADDRESS, peer);
    });
    assert_eq!(code(&reply), None);
}

#[test]
fn peer_datagrams_too_large_for_the_client_are_dropped_and_counted() {
    let mut h = Harness::new();
    let mut c = client(40000, "alice", "wonderland");
    c.allocate(&mut h);
    let alloc = relayed_alloc(&h);
    let peer: SocketAddr = "127.0.0.1:7000".parse().expect("a");
    let reply = c.call(&mut h, method::CREATE_PERMISSION, peer_attr(peer));
    assert_eq!(code(&reply), None);
    let _ = h.core.take_stats();
    let mut buf = vec![0u8; 4 + 65_520];
    // 20 + 12 + 4 + 65520 bytes: above a UDP datagram, and its length field would wrap.
    assert_eq!(
        h.core
            .handle_peer(alloc, peer, &mut buf, 65_520, h.now, &mut h.out),
        PeerAction::Drop
    );
    // The largest that fits one datagram to an IPv4 client (padded to four bytes) still goes.
    let fits = (65_507 - 20 - 12 - 4) & !3;
    assert_eq!(
        h.core
            .handle_peer(alloc, peer, &mut buf, fits, h.now, &mut h.out),
        PeerAction::DataIndication { client: c.id }
    );
    let ind = Message::parse(&h.out[..]).expect("parses");
    assert_eq!(ind.get(attr::DATA).map(<[u8]>::len), Some(fits));
    let stats = h.core.take_stats();
    assert_eq!(stats.oversized, 1);
    assert_eq!(stats.total().relayed_packets[1], 1);
}

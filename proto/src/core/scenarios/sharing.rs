//! Shared relay ports: delivery by exact endpoint, holding and refusing endpoints, their
//! expiry and cap, ports per tenant, and the allocations that keep dedicated ports.

use super::*;
use crate::ports::RelayTransport;
use crate::tenant::Tenant;

const SHARED: &str = "127.0.0.1:50000";
const OTHER_REALM: &str = "b.example";

/// Adds shared ports `ports` (on 127.0.0.1) to the harness's core.
fn add_ports(h: &mut Harness, ports: &[u16]) {
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
}

/// One tenant (alice, bob) relaying through the shared ports `ports`.
fn shared_harness(ports: &[u16]) -> Harness {
    let mut h = Harness::new();
    add_ports(&mut h, ports);
    h
}

/// Two tenants: the default one (alice, bob) and `b` (carol, in [`OTHER_REALM`]); `tweak`
/// changes the configuration further.
fn tenants_harness(ports: &[u16], tweak: impl FnOnce(&mut CoreConfig)) -> Harness {
    let mut h = Harness::configured(Quotas::default(), true, |c| {
        let loopback = vec!["127.0.0.0/8".parse().expect("net")];
        let default = Tenant::new(
            crate::tenant::DEFAULT_TENANT,
            Credentials::new(
                REALM,
                [("alice", "wonderland"), ("bob", "builder")],
                [SECRET.to_owned()],
            ),
            test_policy(loopback.clone()),
        );
        let b = Tenant::new(
            "b",
            Credentials::new(OTHER_REALM, [("carol", "singer")], []),
            test_policy(loopback),
        );
        c.tenants = Tenants::new(REALM, vec![default, b]);
        tweak(c);
    });
    add_ports(&mut h, ports);
    h
}

fn carol(port: u16) -> Client {
    client_in(port, "carol", "singer", OTHER_REALM)
}

fn port(index: u16) -> SharedPortId {
    SharedPortId { v6: false, index }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

fn channel_bind(c: &mut Client, h: &mut Harness, number: u16, peer: SocketAddr) -> Option<u16> {
    let req = c.request(method::CHANNEL_BIND, |b| {
        b.u32(attr::CHANNEL_NUMBER, u32::from(number) << 16)
            .xor_address(attr::XOR_PEER_ADDRESS, peer);
    });
    code(&h.send(&req, c.id).expect("reply"))
}

fn permit(c: &mut Client, h: &mut Harness, peers: &[SocketAddr]) -> Option<u16> {
    let req = c.request(method::CREATE_PERMISSION, |b| {
        for p in peers {
            b.xor_address(attr::XOR_PEER_ADDRESS, *p);
        }
    });
    code(&h.send(&req, c.id).expect("reply"))
}

/// Ends the client's allocation (Refresh with LIFETIME 0).
fn release(c: &mut Client, h: &mut Harness) {
    let req = c.request(method::REFRESH, |m| {
        m.u32(attr::LIFETIME, 0);
    });
    assert_eq!(code(&h.send(&req, c.id).expect("reply")), None);
}

/// A Send indication to `peer`: where the relay sends it, if anywhere.
fn send(c: &Client, h: &mut Harness, peer: SocketAddr) -> Option<SocketAddr> {
    match h
        .core
        .handle_client(&send_indication(peer, 1), c.id, h.now, h.unix, &mut h.out)
    {
        ClientAction::Relay { peer, .. } => Some(peer),
        _ => None,
    }
}

/// ChannelData on `number`: where the relay sends it, if anywhere.
fn channel_data(c: &Client, h: &mut Harness, number: u16) -> Option<SocketAddr> {
    let mut frame = number.to_be_bytes().to_vec();
    frame.extend_from_slice(&[0, 4]);
    frame.extend_from_slice(b"data");
    match h
        .core
        .handle_client(&frame, c.id, h.now, h.unix, &mut h.out)
    {
        ClientAction::Relay { peer, .. } => Some(peer),
        _ => None,
    }
}

/// A datagram from `peer` to shared port `index`: which client gets it, if any.
fn from_peer(h: &mut Harness, index: u16, peer: &str) -> Option<ClientId> {
    let mut buf = [0u8; 32];
    buf[4..8].copy_from_slice(b"ping");
    match h
        .core
        .handle_shared_peer(port(index), addr(peer), &mut buf, 4, h.now, &mut h.out)
    {
        PeerAction::Drop => None,
        PeerAction::ChannelData { client, .. } | PeerAction::DataIndication { client } => {
            Some(client)
        }
    }
}

#[test]
fn allocations_share_a_port_and_are_told_apart_by_exact_endpoint() {
    let mut h = shared_harness(&[50000]);
    let mut a = client(40000, "alice", "wonderland");
    let mut b = client(40001, "bob", "builder");
    assert_eq!(relayed_of(&a.allocate(&mut h)).to_string(), SHARED);
    assert_eq!(relayed_of(&b.allocate(&mut h)).to_string(), SHARED);
    // The relay binds nothing for them: no port of the range is taken beyond the shared one.
    let ip = "127.0.0.1".parse().expect("ip");
    assert_eq!(h.core.shared().ports.in_use(RelayTransport::Udp, ip), 1);

    assert_eq!(
        channel_bind(&mut a, &mut h, 0x4001, addr("127.0.0.1:7000")),
        None
    );
    assert_eq!(
        channel_bind(&mut b, &mut h, 0x4001, addr("127.0.0.1:7001")),
        None
    );
    assert_eq!(from_peer(&mut h, 0, "127.0.0.1:7000"), Some(a.id));
    assert_eq!(from_peer(&mut h, 0, "127.0.0.1:7001"), Some(b.id));
    // Another port of that IP, and an IP nobody permitted: nobody's.
    assert_eq!(from_peer(&mut h, 0, "127.0.0.1:7002"), None);
    assert_eq!(from_peer(&mut h, 0, "127.0.0.9:7000"), None);
    assert_eq!(h.core.take_stats().shared_port_unmatched, 2);
    h.core.check_sharing();
}

#[test]
fn an_ip_wide_permission_captures_no_other_port_of_that_ip() {
    let mut h = shared_harness(&[50000]);
    let mut a = client(40000, "alice", "wonderland");
    a.allocate(&mut h);
    // Alice names port 7001 of 127.0.0.1; the permission is for the IP, the delivery is not.
    assert_eq!(permit(&mut a, &mut h, &[addr("127.0.0.1:7001")]), None);
    assert_eq!(from_peer(&mut h, 0, "127.0.0.1:7000"), None);
    // A receive-first ICE check from the endpoint she named arrives, as a Data indication.
    assert_eq!(from_peer(&mut h, 0, "127.0.0.1:7001"), Some(a.id));
    assert!(matches!(
        Message::parse(&h.out).map(|m| (m.class(), m.method())),
        Ok((Class::Indication, method::DATA))
    ));
    // Receiving claimed nothing: Bob may send to the port she never named, and its answers
    // are his.
    let mut b = client(40001, "bob", "builder");
    b.allocate(&mut h);
    assert_eq!(permit(&mut b, &mut h, &[addr("127.0.0.1:7000")]), None);
    assert_eq!(
        send(&b, &mut h, addr("127.0.0.1:7000")),
        Some(addr("127.0.0.1:7000"))
    );
    assert_eq!(from_peer(&mut h, 0, "127.0.0.1:7000"), Some(b.id));
    h.core.check_sharing();
}

#[test]
fn the_allocation_that_named_the_exact_endpoint_gets_it_beside_an_ip_permission() {
    let mut h = shared_harness(&[50000]);
    let mut a = client(40000, "alice", "wonderland");
    let mut b = client(40001, "bob", "builder");
    a.allocate(&mut h);
    b.allocate(&mut h);
    // An SFU with a port per participant: Alice's is 9001, Bob's 9000.
    assert_eq!(permit(&mut a, &mut h, &[addr("127.0.0.2:9001")]), None);
    assert_eq!(permit(&mut b, &mut h, &[addr("127.0.0.2:9000")]), None);
    assert_eq!(from_peer(&mut h, 0, "127.0.0.2:9000"), Some(b.id));
    assert_eq!(from_peer(&mut h, 0, "127.0.0.2:9001"), Some(a.id));
    assert_eq!(h.core.take_stats().shared_port_unmatched, 0);
}

#[test]
fn a_held_endpoint_is_refused_within_the_tenant_and_another_tenant_is_unaffected() {
    let mut h = tenants_harness(&[50000], |_| {});
    let mut a = client(40000, "alice", "wonderland");
    let mut b = client(40001, "bob", "builder");
    let mut c = carol(40002);
    assert_eq!(relayed_of(&a.allocate(&mut h)).to_string(), SHARED);
    assert_eq!(relayed_of(&b.allocate(&mut h)).to_string(), SHARED);
    let sfu = addr("127.0.0.2:9000");
    // Alice sends to the SFU first: she holds it on the port.
    assert_eq!(permit(&mut a, &mut h, &[addr("127.0.0.2:1")]), None);
    assert_eq!(send(&a, &mut h, sfu), Some(sfu));
    // Bob, of her tenant and on her port, is refused it every way; each counted.
    assert_eq!(permit(&mut b, &mut h, &[sfu]), Some(403));
    assert_eq!(channel_bind(&mut b, &mut h, 0x4001, sfu), Some(403));
    assert_eq!(permit(&mut b, &mut h, &[addr("127.0.0.2:2")]), None);
    assert_eq!(send(&b, &mut h, sfu), None);
    assert_eq!(h.core.take_stats().shared_port_conflicts, 3);
    assert_eq!(from_peer(&mut h, 0, "127.0.0.2:9000"), Some(a.id));

    // Carol, of tenant b, is never given tenant a's port: the only shared one serves a, so
    // she relays through a dedicated port, and the SFU is hers there.
    let carols = relayed_of(&c.allocate(&mut h));
    assert_ne!(carols.to_string(), SHARED);
    assert_eq!(h.core.take_stats().shared_port_fallbacks, 1);
    assert_eq!(channel_bind(&mut c, &mut h, 0x4001, sfu), None);
    assert_eq!(channel_data(&c, &mut h, 0x4001), Some(sfu));

    // Alice's allocation ends: the endpoint is Bob's for the asking.
    release(&mut a, &mut h);
    assert_eq!(channel_bind(&mut b, &mut h, 0x4001, sfu), None);
    assert_eq!(from_peer(&mut h, 0, "127.0.0.2:9000"), Some(b.id));
    h.core.check_sharing();
}

#[test]
fn channel_data_goes_only_to_an_endpoint_the_allocation_holds_now() {
    let mut h = shared_harness(&[50000]);
    let mut a = client(40000, "alice", "wonderland");
    let mut b = client(40001, "bob", "builder");
    a.allocate(&mut h);
    b.allocate(&mut h);
    let peer = addr("127.0.0.2:9000");
    assert_eq!(channel_bind(&mut a, &mut h, 0x4001, peer), None);
    assert_eq!(channel_data(&a, &mut h, 0x4001), Some(peer));
    // Alice's permission lapses (her channel lives 600 s); Bob takes the endpoint.
    h.advance(301);
    assert_eq!(channel_data(&a, &mut h, 0x4001), None, "no permission");
    assert_eq!(permit(&mut b, &mut h, &[peer]), None);
    // Alice permits the IP again, through another of its ports: her channel stays off
    // Bob's endpoint, and its datagrams stay his.
    assert_eq!(permit(&mut a, &mut h, &[addr("127.0.0.2:9001")]), None);
    assert_eq!(channel_data(&a, &mut h, 0x4001), None, "Bob holds it");
    assert_eq!(from_peer(&mut h, 0, "127.0.0.2:9000"), Some(b.id));
    assert_eq!(h.core.take_stats().shared_port_conflicts, 1);
    h.core.check_sharing();
}

#[test]
fn channel_data_on_a_channel_whose_endpoint_is_free_takes_it_again() {
    let mut h = shared_harness(&[50000]);
    let mut a = client(40000, "alice", "wonderland");
    a.allocate(&mut h);
    let peer = addr("127.0.0.2:9000");
    assert_eq!(channel_bind(&mut a, &mut h, 0x4001, peer), None);
    h.advance(301);
    assert_eq!(from_peer(&mut h, 0, "127.0.0.2:9000"), None, "lapsed");
    // A permission for the IP, renewed through another port, and the channel's own data
    // names its endpoint again, which nobody holds.
    assert_eq!(permit(&mut a, &mut h, &[addr("127.0.0.2:1")]), None);
    assert_eq!(channel_data(&a, &mut h, 0x4001), Some(peer));
    assert_eq!(from_peer(&mut h, 0, "127.0.0.2:9000"), Some(a.id));
}

#[test]
fn channel_bind_answers_from_the_clients_own_state_before_other_holders() {
    let mut h = shared_harness(&[50000]);
    let mut a = client(40000, "alice", "wonderland");
    let mut b = client(40001, "bob", "builder");
    a.allocate(&mut h);
    b.allocate(&mut h);
    let held = addr("127.0.0.2:9000");
    let free = addr("127.0.0.2:9001");
    assert_eq!(channel_bind(&mut b, &mut h, 0x4001, held), None);
    assert_eq!(
        channel_bind(&mut a, &mut h, 0x4001, addr("127.0.0.3:1")),
        None
    );
    // Channel 0x4001 is bound to another peer: 400, whether or not someone holds the
    // endpoint, so the answer cannot be used to scan what others hold.
    assert_eq!(channel_bind(&mut a, &mut h, 0x4001, held), Some(400));
    assert_eq!(channel_bind(&mut a, &mut h, 0x4001, free), Some(400));
    assert_eq!(h.core.take_stats().shared_port_conflicts, 0);
    // Only a request that is good for Alice's own allocation learns the endpoint is held.
    assert_eq!(channel_bind(&mut a, &mut h, 0x4002, held), Some(403));
    assert_eq!(channel_bind(&mut a, &mut h, 0x4002, free), None);
}

#[test]
fn endpoints_leave_the_index_when_their_permission_ends() {
    let mut h = shared_harness(&[50000]);
    let mut clients: Vec<Client> = (0..20)
        .map(|i| client(41000 + i, "alice", "wonderland"))
        .collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.allocate(&mut h);
        let peers: Vec<SocketAddr> = (0..3)
            .map(|k| SocketAddr::new([127, 0, 1, i as u8].into(), 9000 + k))
            .collect();
        assert_eq!(permit(c, &mut h, &peers), None);
    }
    assert_eq!(h.core.sharing.indexed(), 60);
    // The first ten refresh their permissions at 200 s.
    h.advance(200);
    for (i, c) in clients.iter_mut().take(10).enumerate() {
        let peer = SocketAddr::new([127, 0, 1, i as u8].into(), 9000);
        assert_eq!(permit(c, &mut h, &[peer]), None);
    }
    // At 300 s the others' permissions end, and their endpoints with them, by the timer:
    // nothing expired stays indexed for datagrams to walk.
    h.advance(100);
    assert_eq!(h.core.sharing.indexed(), 30);
    assert_eq!(from_peer(&mut h, 0, "127.0.1.15:9000"), None);
    assert_eq!(from_peer(&mut h, 0, "127.0.1.5:9002"), Some(clients[5].id));
    h.advance(200);
    assert_eq!(h.core.sharing.indexed(), 0);
    h.core.check_sharing();
}

#[test]
fn endpoints_per_allocation_are_capped() {
    let mut h = tenants_harness(&[50000], |c| c.max_peer_endpoints = 3);
    let mut a = client(40000, "alice", "wonderland");
    a.allocate(&mut h);
    let peers: Vec<SocketAddr> = (0..4)
        .map(|k| SocketAddr::new([127, 0, 0, 2].into(), 9000 + k))
        .collect();
    // Four at once: 508, and nothing installed.
    assert_eq!(permit(&mut a, &mut h, &peers), Some(508));
    assert_eq!(from_peer(&mut h, 0, "127.0.0.2:9000"), None);
    assert_eq!(h.core.take_stats().shared_port_endpoint_limit, 1);
    assert_eq!(permit(&mut a, &mut h, &peers[..3]), None);
    // A fourth by ChannelBind: 508; by Send: dropped; both counted.
    assert_eq!(channel_bind(&mut a, &mut h, 0x4001, peers[3]), Some(508));
    assert_eq!(send(&a, &mut h, peers[3]), None);
    assert_eq!(h.core.take_stats().shared_port_endpoint_limit, 2);
    // Naming one it holds again is no new endpoint.
    assert_eq!(channel_bind(&mut a, &mut h, 0x4001, peers[0]), None);
    assert_eq!(send(&a, &mut h, peers[1]), Some(peers[1]));
    // When the permission ends, so do the endpoints: room again.
    h.advance(301);
    assert_eq!(permit(&mut a, &mut h, &[peers[3]]), None);
    h.core.check_sharing();
}

#[test]
fn tenants_never_share_a_port_and_divide_the_ports_fairly() {
    let mut h = tenants_harness(&[50000, 50001, 50002, 50003], |_| {});
    let port_of = |r: &[u8]| relayed_of(r).port();
    // Tenant a alone spreads over every port.
    let mut alone = Vec::new();
    for i in 0..4 {
        let mut c = client(40000 + i, "alice", "wonderland");
        alone.push((port_of(&c.allocate(&mut h)), c));
    }
    let mut used: Vec<u16> = alone.iter().map(|(p, _)| *p).collect();
    used.sort_unstable();
    assert_eq!(used, [50000, 50001, 50002, 50003]);
    // Tenant b finds every port serving a: a dedicated port, counted.
    let mut c = carol(41000);
    let first = port_of(&c.allocate(&mut h));
    assert!(!(50000..=50003).contains(&first), "{first}");
    assert_eq!(h.core.take_stats().shared_port_fallbacks, 1);
    // Once a port's last allocation of a ends, it is free, and b takes it.
    let (freed, mut gone) = alone.remove(0);
    release(&mut gone, &mut h);
    let mut c2 = carol(41001);
    assert_eq!(port_of(&c2.allocate(&mut h)), freed);
    // Now both tenants hold ports, each may take up to half of them: a holds three and
    // takes no other; b's next allocations share its one port with b's own, never a's.
    let mut c3 = carol(41002);
    assert_eq!(port_of(&c3.allocate(&mut h)), freed);
    let mut a5 = client(40010, "alice", "wonderland");
    let p = port_of(&a5.allocate(&mut h));
    assert!(p != freed && (50000..=50003).contains(&p), "{p}");
    h.core.check_sharing();
}

#[test]
fn allocations_spread_over_the_ports_and_even_port_keeps_a_dedicated_one() {
    let mut h = shared_harness(&[50000, 50001]);
    let mut ports = Vec::new();
    for i in 0..4 {
        let mut c = client(40000 + i, "alice", "wonderland");
        ports.push(relayed_of(&c.allocate(&mut h)).port());
    }
    // Clients of one IP on different ports first; the odd port first on a tie, keeping the
    // even one for EVEN-PORT.
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
    h.core.check_sharing();
}

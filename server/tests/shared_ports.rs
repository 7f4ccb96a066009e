//! Shared relay ports (`shared_relay_ports`): many allocations relay through a few ports,
//! told apart by peer address, with coturn's `turnutils_uclient`, the `turn` crate's client
//! and a raw client for exact answers; and the start-up errors of a bad setting.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{free_port_range, lost_packets, run_tool, RawClient, Relay, REALM};
use turnpike_proto::stun::{attr, method, Builder, Class};
use webrtc_util::Conn;

/// A relay on `threads` threads with `per_thread` shared ports at the bottom of a free range
/// of 16 ports; returns the relay and the range's first port.
fn shared_relay(threads: &str, per_thread: &str) -> (Relay, u16) {
    let range = free_port_range(16);
    let first = *range.start();
    let ports = format!("{}-{}", range.start(), range.end());
    let relay = Relay::start(&[
        "--allow-peer",
        "127.0.0.0/8",
        "--user",
        "alice:wonderland",
        "--user",
        "bob:builder",
        "--relay-ports",
        &ports,
        "--threads",
        threads,
        "--shared-relay-ports",
        per_thread,
    ]);
    (relay, first)
}

fn channel_bind(c: &mut RawClient, number: u16, peer: SocketAddr) -> Option<u16> {
    c.request(method::CHANNEL_BIND, |b| {
        b.u32(attr::CHANNEL_NUMBER, u32::from(number) << 16)
            .xor_address(attr::XOR_PEER_ADDRESS, peer);
    })
    .code()
}

fn relayed(c: &mut RawClient) -> SocketAddr {
    let r = c.allocate();
    assert_eq!(r.code(), None, "allocate");
    r.xor_addrs(attr::XOR_RELAYED_ADDRESS)[0]
}

/// Reads one ChannelData frame from the relay: (channel, payload).
fn channel_data(c: &RawClient) -> Option<(u16, Vec<u8>)> {
    let mut buf = [0u8; 1500];
    let (n, _) = c.sock.recv_from(&mut buf).ok()?;
    (n >= 4 && buf[0] & 0xc0 == 0x40).then(|| {
        let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
        (
            u16::from_be_bytes([buf[0], buf[1]]),
            buf[4..4 + len].to_vec(),
        )
    })
}

#[test]
fn allocations_on_one_port_are_told_apart_and_a_held_peer_is_refused() {
    let (relay, first) = shared_relay("1", "1");
    let mut alice = RawClient::new(relay.udp, "alice", "wonderland");
    let mut bob = RawClient::new(relay.udp, "bob", "builder");
    // One thread, one shared port: the lowest of the range, for both.
    let shared = SocketAddr::from(([127, 0, 0, 1], first));
    assert_eq!(relayed(&mut alice), shared);
    assert_eq!(relayed(&mut bob), shared);
    // Ports bound no allocations here: the capacity alert's port gauge says 0.
    assert_eq!(relay.metric("turnpike_relay_ports"), 0.0);

    let peer_a = UdpSocket::bind("127.0.0.1:0").expect("peer");
    let peer_b = UdpSocket::bind("127.0.0.1:0").expect("peer");
    let (pa, pb) = (
        peer_a.local_addr().expect("a"),
        peer_b.local_addr().expect("a"),
    );
    assert_eq!(channel_bind(&mut alice, 0x4001, pa), None);
    assert_eq!(channel_bind(&mut bob, 0x4002, pb), None);
    // Each peer's datagrams reach only the allocation that bound it.
    for round in 0..5u8 {
        peer_a.send_to(&[b'a', round], shared).expect("send");
        peer_b.send_to(&[b'b', round], shared).expect("send");
        assert_eq!(channel_data(&alice), Some((0x4001, vec![b'a', round])));
        assert_eq!(channel_data(&bob), Some((0x4002, vec![b'b', round])));
    }
    // And what the clients send leaves the shared port to their own peer.
    let mut frame = vec![0x40, 0x02, 0, 3];
    frame.extend_from_slice(b"bob");
    bob.sock.send_to(&frame, relay.udp).expect("send");
    peer_b
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    let (n, from) = peer_b.recv_from(&mut buf).expect("bob's datagram");
    assert_eq!((&buf[..n], from), (&b"bob"[..], shared));

    // Bob asks for Alice's peer address on the same port: 403, counted; his Send is dropped.
    assert_eq!(channel_bind(&mut bob, 0x4003, pa), Some(403));
    let mut ind = Vec::new();
    let tid = bob.tid();
    Builder::new(&mut ind, Class::Indication, method::SEND, tid)
        .xor_address(attr::XOR_PEER_ADDRESS, pa)
        .attr(attr::DATA, b"not for alice's peer");
    bob.sock.send_to(&ind, relay.udp).expect("send");
    assert_eq!(
        relay.wait_metric("turnpike_shared_port_conflicts_total", 2.0),
        2.0
    );
    peer_a
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    assert!(
        peer_a.recv_from(&mut buf).is_err(),
        "Bob's Send reached the peer Alice holds"
    );
    // A peer no allocation permitted: dropped and counted.
    let stranger = UdpSocket::bind("127.0.0.3:0").expect("stranger");
    stranger.send_to(b"hello?", shared).expect("send");
    assert!(relay.wait_metric("turnpike_dropped_packets_total{reason=\"unmatched\"", 1.0) >= 1.0);

    // Alice's allocation ends: the address is Bob's to bind, and its datagrams reach him.
    let r = alice.request(method::REFRESH, |b| {
        b.u32(attr::LIFETIME, 0);
    });
    assert_eq!(r.code(), None);
    assert_eq!(channel_bind(&mut bob, 0x4003, pa), None);
    peer_a.send_to(b"now bob", shared).expect("send");
    assert_eq!(channel_data(&bob), Some((0x4003, b"now bob".to_vec())));
}

#[test]
fn coturn_uclient_relays_through_the_shared_ports_and_loses_nothing() {
    // One thread with four shared ports, two of them even: uclient's two allocations (-c: no
    // RTCP pair, whose reservation needs ports of their own; half of uclient's allocations
    // then ask for EVEN-PORT, which an even shared port serves) land on a port each, both
    // towards one peer.
    let (relay, first) = shared_relay("1", "4");
    let (_peer, peer_port) = common::turnutils_peer();
    let port = relay.udp.port().to_string();
    let peer_port = peer_port.to_string();
    let out = run_tool(
        "turnutils_uclient",
        &[
            // -v: it prints each relayed address it is given.
            "-v",
            "-c",
            "-e",
            "127.0.0.1",
            "-r",
            &peer_port,
            "-u",
            "alice",
            "-w",
            "wonderland",
            "-p",
            &port,
            "-m",
            "1",
            "-n",
            "300",
            "-l",
            "120",
            "127.0.0.1",
        ],
        60,
    );
    assert_eq!(lost_packets(&out), 0, "{out}");
    assert!(!out.contains("error"), "{out}");
    assert!(relay.metric("turnpike_allocations_total") >= 2.0);
    assert_eq!(relay.metric("turnpike_shared_port_conflicts_total"), 0.0);
    // The shared ports were logged, and uclient's allocations were all on them: none got a
    // port of its own (uclient prints each relayed address it was given).
    let log = relay.log_text();
    let listed: Vec<String> = (first..first + 4)
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    assert!(
        log.contains(&listed.join(" ")),
        "shared ports not logged:\n{log}"
    );
    let relayed: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split("Received relay addr: ").nth(1))
        .map(str::trim)
        .collect();
    assert_eq!(relayed.len(), 2, "{out}");
    for r in relayed {
        assert!(listed.iter().any(|l| l == r), "{r} is not a shared port");
    }
}

#[tokio::test]
async fn turn_crate_clients_each_reach_their_own_peer_through_two_ports() {
    let (relay, first) = shared_relay("2", "1");
    let shared = [first, first + 1];
    let mut tasks = Vec::new();
    for i in 0..6u8 {
        let server = relay.udp.to_string();
        tasks.push(tokio::spawn(async move {
            let sock = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await?);
            let client = turn::client::Client::new(turn::client::ClientConfig {
                stun_serv_addr: server.clone(),
                turn_serv_addr: server,
                username: "alice".into(),
                password: "wonderland".into(),
                realm: REALM.to_owned(),
                software: String::new(),
                rto_in_ms: 0,
                conn: sock,
                vnet: None,
            })
            .await?;
            client.listen().await?;
            let conn = client.allocate().await?;
            let relayed = conn.local_addr()?;
            let peer = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
            let peer_addr = peer.local_addr()?;
            let mut buf = [0u8; 64];
            for n in 0..10u8 {
                // Resent (bounded) if lost: the first Send can race the client's own
                // CreatePermission.
                let mut got = None;
                for _ in 0..3 {
                    conn.send_to(&[i, n], peer_addr).await?;
                    if let Ok(r) =
                        tokio::time::timeout(Duration::from_secs(1), peer.recv_from(&mut buf)).await
                    {
                        got = Some(r?);
                        break;
                    }
                }
                let (len, from) = got.ok_or("the peer got nothing")?;
                assert_eq!((&buf[..len], from), (&[i, n][..], relayed));
                peer.send_to(&[n, i], relayed).await?;
                let (len, from) =
                    tokio::time::timeout(Duration::from_secs(3), conn.recv_from(&mut buf))
                        .await
                        .map_err(|_| "the client got nothing back")??;
                // Only its own peer's answer, never another client's.
                assert_eq!((&buf[..len], from), (&[n, i][..], peer_addr));
            }
            conn.close().await?;
            client.close().await?;
            Ok::<u16, Box<dyn std::error::Error + Send + Sync>>(relayed.port())
        }));
    }
    for t in tasks {
        let port = t.await.expect("task").expect("round trips");
        assert!(shared.contains(&port), "relayed on {port}, not {shared:?}");
    }
}

#[test]
fn shared_ports_that_do_not_fit_the_range_fail_at_start_naming_the_setting() {
    let run = |args: &[&str]| {
        let out = Command::new(common::relay_binary())
            .args(["--listen", "udp://127.0.0.1:0", "--relay-ip", "127.0.0.1"])
            .args(args)
            .output()
            .expect("run turnpike");
        assert!(!out.status.success(), "started with {args:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&["--relay-ports", "50000-50009", "--shared-relay-ports", "20"]);
    assert!(
        err.contains("--shared-relay-ports") && err.contains("10 ports"),
        "{err}"
    );
    let range = free_port_range(10);
    let ports = format!("{}-{}", range.start(), range.end());
    let err = run(&[
        "--relay-ports",
        &ports,
        "--threads",
        "2",
        "--shared-relay-ports",
        "6",
    ]);
    assert!(
        err.contains("shared_relay_ports") && err.contains("do not fit"),
        "{err}"
    );
}

/// Reads one Data indication from the relay: (peer, data).
fn data_indication(c: &RawClient) -> Option<(SocketAddr, Vec<u8>)> {
    let mut buf = [0u8; 1500];
    let (n, _) = c.sock.recv_from(&mut buf).ok()?;
    let msg = turnpike_proto::stun::Message::parse(&buf[..n]).ok()?;
    if (msg.class(), msg.method()) != (Class::Indication, method::DATA) {
        return None;
    }
    let peer = msg.xor_address(msg.get(attr::XOR_PEER_ADDRESS)?)?;
    Some((peer, msg.get(attr::DATA)?.to_vec()))
}

fn permit(c: &mut RawClient, peers: &[SocketAddr]) -> Option<u16> {
    c.request(method::CREATE_PERMISSION, |b| {
        for p in peers {
            b.xor_address(attr::XOR_PEER_ADDRESS, *p);
        }
    })
    .code()
}

fn send_indication(c: &mut RawClient, peer: SocketAddr, data: &[u8]) {
    let mut ind = Vec::new();
    let tid = c.tid();
    Builder::new(&mut ind, Class::Indication, method::SEND, tid)
        .xor_address(attr::XOR_PEER_ADDRESS, peer)
        .attr(attr::DATA, data);
    c.sock.send_to(&ind, c.server).expect("send");
}

/// Whether `c` receives nothing more: asked once the relay counted what it did with the
/// datagram that might have reached it, so nothing can still be on its way.
fn quiet(c: &RawClient) -> bool {
    c.sock.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 1500];
    let got = c.sock.recv_from(&mut buf).is_ok();
    c.sock.set_nonblocking(false).expect("blocking");
    !got
}

/// One thread, one shared port, two tenants: Alice and Bob of `a`, Carol of `b`. The rules of
/// the shared mode as clients see them: delivery by exact endpoint and never by an IP-wide
/// permission, a held endpoint refused within the tenant, the other tenant unaffected (its
/// allocation is never given `a`'s port), the cap on endpoints per allocation.
#[test]
fn three_clients_of_two_tenants_on_one_port_keep_to_their_own_endpoints() {
    let range = free_port_range(16);
    let config = common::ConfigFile::new(
        "shared-tenants",
        &format!(
            r#"
listen = ["udp://127.0.0.1:0"]
relay_ips = ["127.0.0.1"]
relay_ports = "{}-{}"
shared_relay_ports = 1
[allocation]
max_peer_endpoints = 3
[peer]
allow = ["127.0.0.0/8"]
[[tenant]]
name = "a"
realm = "a.test"
origins = ["https://a.test"]
users = [{{ name = "alice", password = "a-pass" }}, {{ name = "bob", password = "b-pass" }}]
[[tenant]]
name = "b"
realm = "b.test"
origins = ["https://b.test"]
users = [{{ name = "carol", password = "c-pass" }}]
"#,
            range.start(),
            range.end()
        ),
    );
    let relay = Relay::start(&["--config", config.arg(), "--threads", "1"]);
    // ORIGIN names each client's tenant, whose realm its 401 then names.
    let client = |user: &str, password: &str, origin: &str| {
        let mut c = RawClient::new(relay.udp, user, password);
        c.origin = Some(origin.to_owned());
        c
    };
    let mut alice = client("alice", "a-pass", "https://a.test");
    let mut bob = client("bob", "b-pass", "https://a.test");
    let mut carol = client("carol", "c-pass", "https://b.test");
    // The thread's one shared port (the lowest of the range another process does not hold).
    let shared = relayed(&mut alice);
    assert_eq!(relayed(&mut bob), shared);
    assert!(
        relay.log_text().contains(&format!("ports={shared}")),
        "{shared} is not the shared port"
    );
    // The port serves tenant a now: Carol gets a port of her own, and that is counted.
    let carols = relayed(&mut carol);
    assert_ne!(carols, shared);
    assert!(range.contains(&carols.port()), "{carols}");
    assert_eq!(
        relay.wait_metric("turnpike_shared_port_fallbacks_total", 1.0),
        1.0
    );

    let peer = || UdpSocket::bind("127.0.0.1:0").expect("peer");
    let (p1, p2, p3, sfu) = (peer(), peer(), peer(), peer());
    let at = |s: &UdpSocket| s.local_addr().expect("addr");
    // Exact-endpoint delivery: each gets the datagrams of the endpoint it named.
    assert_eq!(permit(&mut alice, &[at(&p1)]), None);
    assert_eq!(permit(&mut bob, &[at(&p2)]), None);
    p1.send_to(b"to alice", shared).expect("send");
    p2.send_to(b"to bob", shared).expect("send");
    assert_eq!(
        data_indication(&alice),
        Some((at(&p1), b"to alice".to_vec()))
    );
    assert_eq!(data_indication(&bob), Some((at(&p2), b"to bob".to_vec())));
    // No capture by IP permission: both permit 127.0.0.1, neither named p3.
    p3.send_to(b"nobody's", shared).expect("send");
    let unmatched = "turnpike_dropped_packets_total{reason=\"unmatched\"";
    assert_eq!(relay.wait_metric(unmatched, 1.0), 1.0);
    assert!(quiet(&alice) && quiet(&bob), "p3's datagram was delivered");

    // A held endpoint is refused within the tenant: Alice sends to the SFU first.
    send_indication(&mut alice, at(&sfu), b"hello sfu");
    sfu.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    let (n, from) = sfu.recv_from(&mut buf).expect("alice's datagram");
    assert_eq!((&buf[..n], from), (&b"hello sfu"[..], shared));
    assert_eq!(permit(&mut bob, &[at(&sfu)]), Some(403));
    assert_eq!(channel_bind(&mut bob, 0x4001, at(&sfu)), Some(403));
    assert_eq!(
        relay.wait_metric("turnpike_shared_port_conflicts_total", 2.0),
        2.0
    );
    sfu.send_to(b"for alice", shared).expect("send");
    assert_eq!(
        data_indication(&alice),
        Some((at(&sfu), b"for alice".to_vec()))
    );

    // The other tenant is unaffected: the SFU is Carol's through her own port, both ways.
    assert_eq!(channel_bind(&mut carol, 0x4001, at(&sfu)), None);
    let mut frame = vec![0x40, 0x01, 0, 5];
    frame.extend_from_slice(b"carol");
    carol.sock.send_to(&frame, relay.udp).expect("send");
    let (n, from) = sfu.recv_from(&mut buf).expect("carol's datagram");
    assert_eq!((&buf[..n], from), (&b"carol"[..], carols));
    sfu.send_to(b"for carol", carols).expect("send");
    assert_eq!(channel_data(&carol), Some((0x4001, b"for carol".to_vec())));

    // The cap: Alice holds p1 and the SFU; two more make four, beyond max_peer_endpoints.
    assert_eq!(permit(&mut alice, &[at(&p2), at(&p3)]), Some(508));
    assert_eq!(
        relay.wait_metric("turnpike_shared_port_endpoint_limit_total", 1.0),
        1.0
    );
    assert_eq!(permit(&mut alice, &[at(&p3)]), None, "a third fits");
}

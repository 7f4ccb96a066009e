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
    // Nothing but the four shared ports was taken from the range: no port of its own for any
    // allocation.
    let log = relay.log_text();
    let listed: Vec<String> = (first..first + 4)
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    assert!(
        log.contains(&listed.join(" ")),
        "shared ports not logged:\n{log}"
    );
    for p in first + 4..first + 16 {
        assert!(
            UdpSocket::bind(("127.0.0.1", p)).is_ok(),
            "port {p} of the range is bound: an allocation got a port of its own"
        );
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

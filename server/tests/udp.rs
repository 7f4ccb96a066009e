//! End-to-end tests of the relay over UDP with independent clients: coturn's
//! `turnutils_uclient` / `turnutils_stunclient`, the classic `stun` client, the `turn` crate's
//! client, and a raw client for exact response codes.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{lost_packets, run_tool, RawClient, Relay, REALM};
use turnpike_proto::auth::{ephemeral_password, ephemeral_username};
use turnpike_proto::stun::{attr, method};
use webrtc_util::Conn;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// `turnutils_uclient -y` as alice: `clients` clients in pairs, `messages` each, 120 bytes.
fn alice_client_to_client(relay: &Relay, clients: &str, messages: &str) -> String {
    let port = relay.udp.port().to_string();
    run_tool(
        "turnutils_uclient",
        &[
            "-y",
            "-u",
            "alice",
            "-w",
            "wonderland",
            "-r",
            REALM,
            "-p",
            &port,
            "-m",
            clients,
            "-n",
            messages,
            "-l",
            "120",
            "127.0.0.1",
        ],
        60,
    )
}

/// On a relay on loopback with the default peer policy, as the README's first try runs it,
/// two clients reach each other's relayed addresses (other allocations of this relay are
/// always peers), while loopback outside the relay ports stays refused.
#[test]
fn clients_of_a_loopback_relay_reach_each_other_without_allowing_loopback() {
    let relay = Relay::start(&["--user", "alice:wonderland"]);
    let out = alice_client_to_client(&relay, "2", "100");
    assert_eq!(lost_packets(&out), 0, "{out}");
    assert!(!out.contains("error"), "{out}");
    let mut c = RawClient::new(relay.udp, "alice", "wonderland");
    assert_eq!(c.allocate().code(), None);
    let service: SocketAddr = "127.0.0.1:3480".parse().expect("addr");
    let r = c.request(method::CREATE_PERMISSION, |b| {
        b.xor_address(attr::XOR_PEER_ADDRESS, service);
    });
    assert_eq!(r.code(), Some(403), "a loopback service is no peer");
}

#[test]
fn coturn_uclient_over_channels_loses_nothing() {
    let relay = Relay::start(&["--allow-peer", "127.0.0.0/8", "--user", "alice:wonderland"]);
    let out = alice_client_to_client(&relay, "4", "500");
    assert_eq!(lost_packets(&out), 0, "{out}");
    assert!(!out.contains("error"), "{out}");
    // 4 clients x 500 packets, through channels (uclient's first few go before the bind).
    assert!(
        relay.wait_metric(
            "turnpike_relayed_packets_total{direction=\"client_to_peer\"}",
            1900.0
        ) >= 1900.0
    );
    assert!(
        relay.metric("turnpike_requests_total{method=\"channel_bind\",result=\"success\"}") >= 8.0
    );
    assert!(relay.metric("turnpike_allocations_total") >= 4.0);
}

#[test]
fn coturn_uclient_over_send_indications_loses_nothing() {
    let relay = Relay::start(&["--allow-peer", "127.0.0.0/8", "--user", "alice:wonderland"]);
    let port = relay.udp.port().to_string();
    let out = run_tool(
        "turnutils_uclient",
        &[
            "-y",
            "-s",
            "-u",
            "alice",
            "-w",
            "wonderland",
            "-r",
            REALM,
            "-p",
            &port,
            "-m",
            "4",
            "-n",
            "500",
            "-l",
            "120",
            "127.0.0.1",
        ],
        60,
    );
    assert_eq!(lost_packets(&out), 0, "{out}");
    assert_eq!(
        relay.metric("turnpike_requests_total{method=\"channel_bind\",result=\"success\"}"),
        0.0
    );
    assert!(
        relay.wait_metric(
            "turnpike_relayed_packets_total{direction=\"peer_to_client\"}",
            1900.0
        ) >= 1900.0
    );
}

/// coturn 4.6's client library (Debian bookworm's, Ubuntu 24.04's) asks for a dual-stack
/// allocation with the draft code 0x8032 of ADDITIONAL-ADDRESS-FAMILY, then relays between the
/// two clients' IPv6 relayed addresses.
#[test]
fn coturn_4_6_uclient_gets_its_dual_stack_allocations() {
    let relay = Relay::start_logging(
        "info,turnpike::io=debug",
        &[
            "--relay-ip",
            "::1",
            "--allow-peer",
            "127.0.0.0/8",
            "--allow-peer",
            "::1/128",
            "--user",
            "alice:wonderland",
        ],
    );
    let port = relay.udp.port().to_string();
    let out = run_tool(
        "turnutils_uclient",
        &[
            "-y",
            "-Z",
            "-u",
            "alice",
            "-w",
            "wonderland",
            "-r",
            REALM,
            "-p",
            &port,
            "-m",
            "1",
            "-n",
            "50",
            "-l",
            "120",
            "127.0.0.1",
        ],
        60,
    );
    assert!(!out.contains("error"), "{out}");
    assert_eq!(lost_packets(&out), 0, "{out}");
    assert!(
        relay.wait_metric(
            "turnpike_relayed_packets_total{direction=\"peer_to_client\"}",
            100.0
        ) >= 100.0,
        "{out}"
    );
    // Both clients' allocations got an IPv6 relayed address beside the IPv4 one.
    relay.wait_for_log("allocation created");
    let log = relay.log_text();
    let dual = log
        .lines()
        .filter(|l| l.contains("allocation created") && l.contains("v6=Some("))
        .count();
    assert!(dual >= 2, "no dual-stack allocations:\n{log}");
}

#[test]
fn coturn_uclient_with_shared_secret_credentials() {
    let relay = Relay::start(&[
        "--allow-peer",
        "127.0.0.0/8",
        "--auth-secret",
        "old-secret",
        "--auth-secret",
        "north",
    ]);
    let port = relay.udp.port().to_string();
    let out = run_tool(
        "turnutils_uclient",
        &[
            "-y",
            "-W",
            "north",
            "-r",
            REALM,
            "-p",
            &port,
            "-m",
            "2",
            "-n",
            "200",
            "-l",
            "120",
            "127.0.0.1",
        ],
        60,
    );
    assert_eq!(lost_packets(&out), 0, "{out}");
    let refused = run_tool(
        "turnutils_uclient",
        &[
            "-y",
            "-W",
            "not-a-secret",
            "-r",
            REALM,
            "-p",
            &port,
            "-m",
            "1",
            "-n",
            "10",
            "-l",
            "120",
            "127.0.0.1",
        ],
        30,
    );
    assert!(refused.contains("Cannot complete Allocation"), "{refused}");
    assert!(relay.wait_metric("turnpike_auth_failures_total{reason=\"bad_password\"}", 1.0) >= 1.0);
}

#[test]
fn binding_answers_coturn_and_classic_stun_clients() {
    let relay = Relay::start(&[]);
    let port = relay.udp.port().to_string();
    let out = run_tool("turnutils_stunclient", &["-p", &port, "127.0.0.1"], 20);
    assert!(out.contains("UDP reflexive addr: 127.0.0.1:"), "{out}");
    // Debian's `stun` sends RFC 3489 requests without the magic cookie.
    let out = run_tool("stun", &[&format!("127.0.0.1:{port}"), "-v"], 20);
    assert!(out.contains("MappedAddress = 127.0.0.1:"), "{out}");
    assert!(relay.metric("turnpike_requests_total{method=\"binding\",result=\"success\"}") >= 2.0);
}

fn turn_client_config(
    relay: &Relay,
    sock: Arc<tokio::net::UdpSocket>,
    user: &str,
    pass: &str,
) -> turn::client::ClientConfig {
    turn::client::ClientConfig {
        stun_serv_addr: relay.udp.to_string(),
        turn_serv_addr: relay.udp.to_string(),
        username: user.to_owned(),
        password: pass.to_owned(),
        realm: REALM.to_owned(),
        software: String::new(),
        rto_in_ms: 0,
        conn: sock,
        vnet: None,
    }
}

/// Allocates with the `turn` crate and relays a round trip to a UDP peer on loopback.
async fn turn_crate_round_trip(relay: &Relay, user: &str, pass: &str) -> Result<(), String> {
    let sock = Arc::new(
        tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?,
    );
    let client = turn::client::Client::new(turn_client_config(relay, sock, user, pass))
        .await
        .map_err(|e| e.to_string())?;
    client.listen().await.map_err(|e| e.to_string())?;
    let conn = client.allocate().await.map_err(|e| e.to_string())?;
    let relayed = conn.local_addr().map_err(|e| e.to_string())?;
    let peer = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let peer_addr = peer.local_addr().map_err(|e| e.to_string())?;
    for i in 0..20u8 {
        let payload = [i; 100];
        let mut buf = [0u8; 200];
        // Resent (bounded) if lost: UDP on a loaded machine may drop, and the turn crate's
        // first Send can race its own CreatePermission.
        let mut got = None;
        for _ in 0..3 {
            conn.send_to(&payload, peer_addr)
                .await
                .map_err(|e| e.to_string())?;
            if let Ok(r) =
                tokio::time::timeout(Duration::from_secs(1), peer.recv_from(&mut buf)).await
            {
                got = Some(r.map_err(|e| e.to_string())?);
                break;
            }
        }
        let (n, from) = got.ok_or_else(|| format!("peer got nothing (packet {i})"))?;
        assert_eq!((&buf[..n], from), (&payload[..], relayed));
        peer.send_to(&[i ^ 0xff; 50], relayed)
            .await
            .map_err(|e| e.to_string())?;
        let (n, from) = tokio::time::timeout(Duration::from_secs(3), conn.recv_from(&mut buf))
            .await
            .map_err(|_| format!("client got nothing back (packet {i})"))?
            .map_err(|e| e.to_string())?;
        assert_eq!((&buf[..n], from), (&[i ^ 0xff; 50][..], peer_addr));
    }
    conn.close().await.map_err(|e| e.to_string())?;
    client.close().await.map_err(|e| e.to_string())?;
    Ok(())
}

#[tokio::test]
async fn turn_crate_client_relays_with_static_and_ephemeral_credentials() {
    let relay = Relay::start(&[
        "--allow-peer",
        "127.0.0.0/8",
        "--user",
        "alice:wonderland",
        "--auth-secret",
        "north",
    ]);
    turn_crate_round_trip(&relay, "alice", "wonderland")
        .await
        .expect("static user relays");
    let user = ephemeral_username(unix_now() + 3600, Some("carol"));
    turn_crate_round_trip(&relay, &user, &ephemeral_password("north", &user))
        .await
        .expect("ephemeral user relays");
    let err = turn_crate_round_trip(&relay, "alice", "wrong")
        .await
        .expect_err("wrong password refused");
    assert!(
        err.contains("401") || err.to_lowercase().contains("unauthorized"),
        "{err}"
    );
}

#[test]
fn wrong_password_and_expired_credentials_get_401() {
    let relay = Relay::start(&["--user", "alice:wonderland", "--auth-secret", "north"]);
    let mut c = RawClient::new(relay.udp, "alice", "not-it");
    assert_eq!(c.allocate().code(), Some(401));

    let expired = ephemeral_username(unix_now() - 10, Some("carol"));
    let mut c = RawClient::new(relay.udp, &expired, &ephemeral_password("north", &expired));
    let r = c.allocate();
    assert_eq!(r.code(), Some(401));
    assert!(r.msg().get(attr::REALM).is_some() && r.msg().get(attr::NONCE).is_some());

    let fresh = ephemeral_username(unix_now() + 60, Some("carol"));
    let mut c = RawClient::new(relay.udp, &fresh, &ephemeral_password("north", &fresh));
    assert_eq!(c.allocate().code(), None);

    assert!(relay.wait_metric("turnpike_auth_failures_total{reason=\"expired\"}", 1.0) >= 1.0);
    assert!(relay.metric("turnpike_auth_failures_total{reason=\"bad_password\"}") >= 1.0);
    let log = relay.log_text();
    assert!(
        !log.contains("wonderland") && !log.contains("north"),
        "secrets leaked into the log:\n{log}"
    );
}

#[test]
fn denied_peers_get_403_and_nothing_reaches_them() {
    // No --allow-peer: loopback is refused by default.
    let relay = Relay::start(&["--user", "alice:wonderland"]);
    let peer = UdpSocket::bind("127.0.0.1:0").expect("peer");
    peer.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let peer_addr = peer.local_addr().expect("addr");
    let mut c = RawClient::new(relay.udp, "alice", "wonderland");
    assert_eq!(c.allocate().code(), None);
    for target in [
        peer_addr,
        "10.1.2.3:9".parse().expect("a"),
        "169.254.169.254:80".parse().expect("a"),
        "[::ffff:127.0.0.1]:9".parse().expect("a"),
    ] {
        let r = c.request(method::CREATE_PERMISSION, |b| {
            b.xor_address(attr::XOR_PEER_ADDRESS, target);
        });
        assert_eq!(r.code(), Some(403), "{target}");
    }
    let r = c.request(method::CHANNEL_BIND, |b| {
        b.u32(attr::CHANNEL_NUMBER, 0x4000 << 16)
            .xor_address(attr::XOR_PEER_ADDRESS, peer_addr);
    });
    assert_eq!(r.code(), Some(403));
    // A Send indication to the refused peer is dropped.
    let mut buf = Vec::new();
    let tid = c.tid();
    turnpike_proto::stun::Builder::new(
        &mut buf,
        turnpike_proto::stun::Class::Indication,
        method::SEND,
        tid,
    )
    .xor_address(attr::XOR_PEER_ADDRESS, peer_addr)
    .attr(attr::DATA, b"must not arrive");
    c.sock.send_to(&buf, relay.udp).expect("send");
    assert_eq!(relay.wait_metric("turnpike_peer_denied_total", 5.0), 5.0);
    let mut got = [0u8; 64];
    assert!(
        peer.recv_from(&mut got).is_err(),
        "the refused peer received a datagram"
    );
}

#[test]
fn even_port_reservations_and_dual_stack_allocations() {
    let relay = Relay::start(&[
        "--user",
        "alice:wonderland",
        "--relay-ip",
        "::1",
        "--relay-ports",
        "50000-50999",
    ]);
    let mut a = RawClient::new(relay.udp, "alice", "wonderland");
    let r = a.request(method::ALLOCATE, |b| {
        b.u32(attr::REQUESTED_TRANSPORT, 17 << 24)
            .u32(attr::EVEN_PORT, 0x8000_0000);
    });
    assert_eq!(r.code(), None);
    let first = r.xor_addrs(attr::XOR_RELAYED_ADDRESS)[0];
    assert_eq!(first.port() % 2, 0, "{first}");
    let token = r
        .msg()
        .get(attr::RESERVATION_TOKEN)
        .expect("token")
        .to_vec();
    let mut b = RawClient::new(relay.udp, "alice", "wonderland");
    let r = b.request(method::ALLOCATE, |m| {
        m.u32(attr::REQUESTED_TRANSPORT, 17 << 24)
            .attr(attr::RESERVATION_TOKEN, &token);
    });
    assert_eq!(r.code(), None);
    assert_eq!(
        r.xor_addrs(attr::XOR_RELAYED_ADDRESS),
        vec![SocketAddr::new(first.ip(), first.port() + 1)]
    );
    let mut c = RawClient::new(relay.udp, "alice", "wonderland");
    let r = c.request(method::ALLOCATE, |m| {
        m.u32(attr::REQUESTED_TRANSPORT, 17 << 24)
            .attr(attr::RESERVATION_TOKEN, &token);
    });
    assert_eq!(r.code(), Some(508), "a token is good once");

    let mut d = RawClient::new(relay.udp, "alice", "wonderland");
    let r = d.request(method::ALLOCATE, |m| {
        m.u32(attr::REQUESTED_TRANSPORT, 17 << 24)
            .u32(attr::ADDITIONAL_ADDRESS_FAMILY, 0x02 << 24);
    });
    assert_eq!(r.code(), None);
    let addrs = r.xor_addrs(attr::XOR_RELAYED_ADDRESS);
    assert_eq!(addrs.len(), 2, "{addrs:?}");
    assert!(addrs[0].is_ipv4() && addrs[1].is_ipv6(), "{addrs:?}");
    let mut e = RawClient::new(relay.udp, "alice", "wonderland");
    let r = e.request(method::ALLOCATE, |m| {
        m.u32(attr::REQUESTED_TRANSPORT, 17 << 24)
            .u32(attr::REQUESTED_ADDRESS_FAMILY, 0x02 << 24);
    });
    assert_eq!(r.code(), None);
    assert_eq!(
        r.xor_addrs(attr::XOR_RELAYED_ADDRESS)[0].ip(),
        "::1".parse::<std::net::IpAddr>().expect("ip")
    );
}

#[test]
fn quotas_refuse_allocations_per_user_and_in_total() {
    let relay = Relay::start(&[
        "--user",
        "alice:wonderland",
        "--user",
        "bob:builder",
        "--user",
        "carol:x",
        "--user-quota",
        "1",
        "--total-quota",
        "2",
    ]);
    assert_eq!(
        RawClient::new(relay.udp, "alice", "wonderland")
            .allocate()
            .code(),
        None
    );
    assert_eq!(
        RawClient::new(relay.udp, "alice", "wonderland")
            .allocate()
            .code(),
        Some(486)
    );
    assert_eq!(
        RawClient::new(relay.udp, "bob", "builder")
            .allocate()
            .code(),
        None
    );
    assert_eq!(
        RawClient::new(relay.udp, "carol", "x").allocate().code(),
        Some(508)
    );
    assert_eq!(relay.wait_metric("turnpike_allocations_active", 2.0), 2.0);
}

#[tokio::test]
async fn malformed_input_never_harms_a_live_allocation() {
    let relay = Relay::start(&["--allow-peer", "127.0.0.0/8", "--user", "alice:wonderland"]);
    let sock = Arc::new(
        tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind"),
    );
    let client = turn::client::Client::new(turn_client_config(&relay, sock, "alice", "wonderland"))
        .await
        .expect("client");
    client.listen().await.expect("listen");
    let conn = client.allocate().await.expect("allocate");
    let relayed = conn.local_addr().expect("relayed");
    let peer = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("peer");
    let peer_addr = peer.local_addr().expect("addr");
    let round_trip = || async {
        conn.send_to(b"ping", peer_addr).await.expect("send");
        let mut buf = [0u8; 2048];
        let (n, _) = tokio::time::timeout(Duration::from_secs(3), peer.recv_from(&mut buf))
            .await
            .expect("peer receives")
            .expect("recv");
        assert_eq!(&buf[..n], b"ping");
        peer.send_to(b"pong", relayed).await.expect("send back");
        // The attacker's junk at the relayed address came from an IP without a permission:
        // the first thing the client receives is the peer's answer.
        let (n, from) = tokio::time::timeout(Duration::from_secs(3), conn.recv_from(&mut buf))
            .await
            .expect("client receives")
            .expect("recv");
        assert_eq!((&buf[..n], from), (&b"pong"[..], peer_addr));
    };
    round_trip().await;

    // Junk at the listener and at the relay port: truncated and corrupted STUN, ChannelData
    // with lying lengths and unbound channels, and random bytes.
    // From another loopback IP, which has no permission on the allocation.
    let attacker = UdpSocket::bind("127.0.0.2:0").expect("attacker");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut valid = Vec::new();
    let mut t = [0u8; 16];
    t[..4].copy_from_slice(&turnpike_proto::stun::MAGIC_COOKIE.to_be_bytes());
    turnpike_proto::stun::Builder::new(
        &mut valid,
        turnpike_proto::stun::Class::Request,
        method::ALLOCATE,
        turnpike_proto::stun::TransactionId(t),
    )
    .u32(attr::REQUESTED_TRANSPORT, 17 << 24)
    .attr(attr::USERNAME, b"alice")
    .fingerprint();
    for i in 0..3000u64 {
        let mut junk = match i % 4 {
            0 => valid[..(rand() as usize) % valid.len()].to_vec(),
            1 => {
                let mut v = valid.clone();
                let at = (rand() as usize) % v.len();
                v[at] ^= (rand() as u8) | 1;
                v
            }
            2 => vec![0x40, (rand() & 0xff) as u8, 0xff, 0xff, 1, 2, 3],
            _ => (0..(rand() % 200)).map(|_| rand() as u8).collect(),
        };
        if junk.is_empty() {
            junk.push(0);
        }
        let _ = attacker.send_to(&junk, relay.udp);
        let _ = attacker.send_to(&junk, relayed);
    }
    round_trip().await;
    assert!(relay.wait_metric("turnpike_dropped_packets_total{reason=\"malformed\"}", 1.0) >= 1.0);
    assert!(
        relay.wait_metric(
            "turnpike_dropped_packets_total{reason=\"no_route\"}",
            3000.0
        ) >= 3000.0
    );
    assert_eq!(relay.metric("turnpike_allocations_active"), 1.0);
}

#[test]
fn sigterm_drains_then_exits() {
    let mut relay = Relay::start(&["--allow-peer", "127.0.0.0/8", "--user", "alice:wonderland"]);
    let mut c = RawClient::new(relay.udp, "alice", "wonderland");
    assert_eq!(c.allocate().code(), None);
    assert_eq!(relay.http_get("/readyz").0, 200);
    relay.signal(libc::SIGTERM);
    relay.wait_for_log("draining");
    assert_eq!(relay.http_get("/readyz").0, 503);
    assert_eq!(
        RawClient::new(relay.udp, "alice", "wonderland")
            .allocate()
            .code(),
        Some(508)
    );
    // The existing allocation is still served.
    let r = c.request(method::REFRESH, |b| {
        b.u32(attr::LIFETIME, 600);
    });
    assert_eq!(r.code(), None);
    // Once it is released the relay stops without waiting out the grace time.
    let r = c.request(method::REFRESH, |b| {
        b.u32(attr::LIFETIME, 0);
    });
    assert_eq!(r.code(), None);
    assert!(relay.wait_exit(4).success());
}

#[test]
fn bad_configuration_stops_the_start_naming_file_key_and_reason() {
    let dir = std::env::temp_dir().join(format!("turnpike-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "listen = [\"udp://127.0.0.1:0\"]\n[peer]\nallow = [\"10.0.0.0/99\"]\n",
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_turnpike"))
        .args(["--config", path.to_str().expect("path")])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("bad.toml") && err.contains("peer.allow") && err.contains("10.0.0.0/99"),
        "{err}"
    );

    std::fs::write(&path, "listen = [\"udp://127.0.0.1:0\"]\nrelm = \"typo\"\n").expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_turnpike"))
        .args(["--config", path.to_str().expect("path")])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("bad.toml") && err.contains("unknown field `relm`") && err.contains("line 2"),
        "{err}"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_turnpike"))
        .args(["--relay-ports", "9-3"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--relay-ports") && err.contains("MIN-MAX"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn embedded_default_prints_a_working_credential() {
    // The embedded default with only the ports moved to ephemeral ones for the test.
    let relay = Relay::spawn(&[
        "--listen",
        "udp://127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--relay-ip",
        "127.0.0.1",
    ]);
    let user = relay.wait_for_log("username: ");
    let pass = relay.wait_for_log("password: ");
    let user = user
        .split("username: ")
        .nth(1)
        .expect("u")
        .trim()
        .to_owned();
    let pass = pass
        .split("password: ")
        .nth(1)
        .expect("p")
        .trim()
        .to_owned();
    // The URL names the listener's real address, ready to paste into a client.
    let url = relay.wait_for_log("url: ");
    assert!(
        url.contains(&format!("turn:{}?transport=udp", relay.udp)),
        "{url}"
    );
    let mut c = RawClient::new(relay.udp, &user, &pass);
    // The default realm, since the harness's --realm is not passed here.
    let r = allocate_in_realm(&mut c, "turnpike");
    assert_eq!(r, None);
}

fn allocate_in_realm(c: &mut RawClient, realm: &str) -> Option<u16> {
    use turnpike_proto::stun::{Builder, Class};
    let first = {
        let mut buf = Vec::new();
        let tid = c.tid();
        Builder::new(&mut buf, Class::Request, method::ALLOCATE, tid)
            .u32(attr::REQUESTED_TRANSPORT, 17 << 24);
        c.exchange(&buf)
    };
    let nonce = first.msg().get(attr::NONCE).expect("nonce").to_vec();
    assert_eq!(first.msg().get(attr::REALM), Some(realm.as_bytes()));
    let key = turnpike_proto::auth::long_term_key(&c.username, realm, &c.password);
    let mut buf = Vec::new();
    let tid = c.tid();
    Builder::new(&mut buf, Class::Request, method::ALLOCATE, tid)
        .u32(attr::REQUESTED_TRANSPORT, 17 << 24)
        .attr(attr::USERNAME, c.username.as_bytes())
        .attr(attr::REALM, realm.as_bytes())
        .attr(attr::NONCE, &nonce)
        .integrity_sha1(&key)
        .fingerprint();
    c.exchange(&buf).code()
}

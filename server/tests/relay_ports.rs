//! Relay ports belong to one allocation at a time, and RFC 6062 TCP allocations are bounded:
//! peer connections per allocation, accept errors that back off, data connections that count
//! in the quotas and metrics.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{
    closes_within, free_port_range, read_frame, ConfigFile, RawClient, Relay, Response, REALM,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use turnpike_proto::stun::{attr, method, Message};

const TCP: u32 = 6 << 24;

/// A relay with UDP and TCP listeners, loopback peers allowed, alice:wonderland, and `config`.
fn relay(config: &ConfigFile) -> Relay {
    Relay::spawn(&[
        "--config",
        config.arg(),
        "--listen",
        "udp://127.0.0.1:0",
        "--listen",
        "tcp://127.0.0.1:0",
        "--relay-ip",
        "127.0.0.1",
        "--allow-peer",
        "127.0.0.0/8",
        "--user",
        "alice:wonderland",
        "--realm",
        REALM,
        "--metrics-listen",
        "127.0.0.1:0",
        "--threads",
        "2",
    ])
}

/// A TCP control connection holding an RFC 6062 allocation; returns it, its client and the
/// relayed address.
async fn tcp_allocation(relay: &Relay) -> (TcpStream, RawClient, SocketAddr) {
    let mut tcp = TcpStream::connect(relay.addr_of("tcp"))
        .await
        .expect("connect");
    let mut c = RawClient::new(relay.udp, "alice", "wonderland");
    let r = c
        .request_on(&mut tcp, method::ALLOCATE, |b| {
            b.u32(attr::REQUESTED_TRANSPORT, TCP);
        })
        .await;
    assert_eq!(r.code(), None, "TCP allocation refused");
    let relayed = r.xor_addrs(attr::XOR_RELAYED_ADDRESS)[0];
    (tcp, c, relayed)
}

async fn permit(tcp: &mut TcpStream, c: &mut RawClient, peer: SocketAddr) {
    let r = c
        .request_on(tcp, method::CREATE_PERMISSION, |b| {
            b.xor_address(attr::XOR_PEER_ADDRESS, peer);
        })
        .await;
    assert_eq!(r.code(), None, "permission refused");
}

fn is_connection_attempt(frame: &[u8]) -> Option<SocketAddr> {
    let m = Message::parse(frame).ok()?;
    if m.method() != method::CONNECTION_ATTEMPT {
        return None;
    }
    m.get(attr::XOR_PEER_ADDRESS).and_then(|v| m.xor_address(v))
}

#[tokio::test]
async fn tcp_allocations_never_share_a_relayed_port() {
    // 250 TCP allocations from 400 ports. Drawn at random without a registry, two would all
    // but surely share a port (no repeat in 250 draws from 400: odds below 1e-30), and the
    // kernel would split one allocation's peers between both listeners.
    let range = free_port_range(400);
    let config = ConfigFile::new(
        "tcp-ports",
        &format!(
            "relay_ports = \"{}-{}\"\n[tcp]\nmax_connections_per_ip = 1000\nmax_unallocated_connections = 1000\n",
            range.start(),
            range.end()
        ),
    );
    let relay = relay(&config);
    let mut allocations = Vec::new();
    for _ in 0..250 {
        allocations.push(tcp_allocation(&relay).await);
    }
    let mut ports: Vec<u16> = allocations.iter().map(|(_, _, r)| r.port()).collect();
    assert!(ports.iter().all(|p| range.contains(p)), "{ports:?}");
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 250, "relayed ports shared between allocations");

    // Each allocation's peers reach that allocation: its control connection hears of them.
    for k in [0, 124, 249] {
        let (tcp, c, relayed) = &mut allocations[k];
        permit(tcp, c, "127.0.0.1:9".parse().expect("addr")).await;
        let peer = TcpStream::connect(*relayed).await.expect("peer connects");
        let from = peer.local_addr().expect("addr");
        let frame = read_frame(tcp, 5).await.expect("ConnectionAttempt");
        assert_eq!(is_connection_attempt(&frame), Some(from), "allocation {k}");
    }
}

#[test]
fn udp_relay_ports_are_handed_out_once_and_free_again_when_the_allocation_ends() {
    let range = free_port_range(10);
    let config = ConfigFile::new(
        "udp-ports",
        &format!("relay_ports = \"{}-{}\"\n", range.start(), range.end()),
    );
    let relay = relay(&config);
    let mut clients: Vec<(RawClient, u16)> = (0..10)
        .map(|_| {
            let mut c = RawClient::new(relay.udp, "alice", "wonderland");
            let r = c.allocate();
            assert_eq!(r.code(), None);
            let port = r.xor_addrs(attr::XOR_RELAYED_ADDRESS)[0].port();
            (c, port)
        })
        .collect();
    let mut ports: Vec<u16> = clients.iter().map(|(_, p)| *p).collect();
    ports.sort_unstable();
    assert_eq!(ports, range.collect::<Vec<_>>());
    let mut one_more = RawClient::new(relay.udp, "alice", "wonderland");
    assert_eq!(one_more.allocate().code(), Some(508), "every port is taken");
    let (c, freed) = &mut clients[3];
    let r = c.request(method::REFRESH, |b| {
        b.u32(attr::LIFETIME, 0);
    });
    assert_eq!(r.code(), None);
    // The port is free once the allocation is gone (its socket closes on the shard's next
    // turn): a new allocation gets it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = RawClient::new(relay.udp, "alice", "wonderland");
        let r: Response = c.allocate();
        if r.code().is_none() {
            assert_eq!(r.xor_addrs(attr::XOR_RELAYED_ADDRESS)[0].port(), *freed);
            break;
        }
        assert!(Instant::now() < deadline, "the freed port never came back");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn peer_connections_are_capped_per_tcp_allocation() {
    let config = ConfigFile::new("tcp-cap", "[allocation]\nmax_tcp_connections = 2\n");
    let relay = relay(&config);
    let (mut tcp, mut c, relayed) = tcp_allocation(&relay).await;
    permit(&mut tcp, &mut c, "127.0.0.1:9".parse().expect("addr")).await;
    let mut peers = Vec::new();
    for i in 0..2 {
        let peer = TcpStream::connect(relayed).await.expect("peer");
        let frame = read_frame(&mut tcp, 5).await.expect("ConnectionAttempt");
        assert_eq!(
            is_connection_attempt(&frame),
            Some(peer.local_addr().expect("addr")),
            "peer {i}"
        );
        peers.push(peer);
    }
    let mut third = TcpStream::connect(relayed).await.expect("third peer");
    assert!(
        closes_within(&mut third, 10).await,
        "a third peer connection was kept"
    );
    assert!(
        read_frame(&mut tcp, 1).await.is_none(),
        "the client heard of a third connection"
    );
    // Connect counts against the same limit: 508.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let target = listener.local_addr().expect("addr");
    let r = c
        .request_on(&mut tcp, method::CONNECT, |b| {
            b.xor_address(attr::XOR_PEER_ADDRESS, target);
        })
        .await;
    assert_eq!(r.code(), Some(508));
}

#[tokio::test]
async fn data_connections_are_charged_to_the_quota_and_counted() {
    let config = ConfigFile::new("tcp-quota", "[quota]\nallocation_bytes_per_sec = 40000\n");
    let relay = relay(&config);
    let (mut tcp, mut c, _) = tcp_allocation(&relay).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let target = listener.local_addr().expect("addr");
    let r = c
        .request_on(&mut tcp, method::CONNECT, |b| {
            b.xor_address(attr::XOR_PEER_ADDRESS, target);
        })
        .await;
    assert_eq!(r.code(), None, "Connect");
    let connection = r.msg().get_u32(attr::CONNECTION_ID).expect("CONNECTION-ID");
    let (mut peer, _) = listener.accept().await.expect("peer accepted");
    let mut data = TcpStream::connect(relay.addr_of("tcp"))
        .await
        .expect("data connection");
    let mut d = RawClient::new(relay.udp, "alice", "wonderland");
    let r = d
        .request_on(&mut data, method::CONNECTION_BIND, |b| {
            b.u32(attr::CONNECTION_ID, connection);
        })
        .await;
    assert_eq!(r.code(), None, "ConnectionBind");

    // 120 kB at 40 kB/s: the bucket holds one second's worth, so the rest takes two more.
    let sent = vec![7u8; 120_000];
    let start = Instant::now();
    let writer = {
        let sent = sent.clone();
        let (_, mut wr) = data.split();
        async move { wr.write_all(&sent).await.expect("write") }
    };
    let mut got = vec![0u8; sent.len()];
    let (_, read) = tokio::join!(writer, peer.read_exact(&mut got));
    read.expect("peer reads everything");
    let took = start.elapsed();
    assert_eq!(got, sent);
    assert!(
        took >= Duration::from_millis(1500),
        "120 kB passed in {took:?} under a 40 kB/s quota"
    );
    peer.write_all(b"back to the client").await.expect("write");
    let mut back = [0u8; 18];
    tokio::time::timeout(Duration::from_secs(5), data.read_exact(&mut back))
        .await
        .expect("answer")
        .expect("read");
    assert_eq!(&back, b"back to the client");
    let up = relay.wait_metric(
        "turnpike_relayed_bytes_total{direction=\"client_to_peer\"}",
        120_000.0,
    );
    let down = relay.wait_metric(
        "turnpike_relayed_bytes_total{direction=\"peer_to_client\"}",
        18.0,
    );
    assert_eq!((up, down), (120_000.0, 18.0));
}

/// CPU ticks (user + system) the process has used, from /proc.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("comm")
        .1
        .split_whitespace()
        .collect();
    // After the command name: state is field 3, utime 14 and stime 15 (1-based).
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

fn open_files(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .count() as u64
}

#[tokio::test]
async fn out_of_descriptors_the_relay_backs_off_instead_of_spinning() {
    let config = ConfigFile::new("emfile", "");
    let relay = relay(&config);
    let (mut tcp, mut c, relayed) = tcp_allocation(&relay).await;
    permit(&mut tcp, &mut c, "127.0.0.1:9".parse().expect("addr")).await;
    // Leave the relay four descriptors, then queue more peer connections than that: they wait
    // unbound for ConnectionBind, and the rest stay in the listener's queue, which accept
    // cannot take (EMFILE).
    let pid = relay.pid();
    let limit = open_files(pid) + 4;
    let status = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .status()
        .expect("prlimit (util-linux)");
    assert!(status.success());
    let mut peers = Vec::new();
    for _ in 0..12 {
        peers.push(TcpStream::connect(relayed).await.expect("peer"));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_files(pid) < limit && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        open_files(pid) >= limit,
        "the relay never ran out of descriptors"
    );
    let before = cpu_ticks(pid);
    let wall = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(pid) - before;
    // SAFETY: sysconf reads a constant of the system.
    let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let share = used as f64 / (wall.elapsed().as_secs_f64() * ticks_per_sec);
    assert!(
        share < 0.2,
        "the relay used {:.0}% of a core while out of descriptors",
        share * 100.0
    );
    // It still relays and answers meanwhile.
    let mut probe = RawClient::new(relay.udp, "alice", "wonderland");
    let r = probe.request(method::BINDING, |_| {});
    assert_eq!(r.code(), None);
}

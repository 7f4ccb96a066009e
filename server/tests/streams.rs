//! End-to-end tests of TURN over TCP and TLS, the shared TLS port (TURN, HTTPS, plain HTTP,
//! an upstream website), PROXY protocol, connection limits, and TURN over TLS through a real
//! HTTP CONNECT proxy (tinyproxy).

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{
    free_port, lost_packets, run_tool, stream_exchange, Child2, RawClient, Relay, TestCert, REALM,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use turnpike_proto::stun::{attr, method, Builder, Class, TransactionId, MAGIC_COOKIE};

fn binding(tid_byte: u8) -> (Vec<u8>, TransactionId) {
    let mut t = [tid_byte; 16];
    t[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    let tid = TransactionId(t);
    let mut buf = Vec::new();
    Builder::new(&mut buf, Class::Request, method::BINDING, tid).fingerprint();
    (buf, tid)
}

#[test]
fn coturn_uclient_over_tcp_and_tls_loses_nothing() {
    let cert = TestCert::new("uclient", &["turn.test", "127.0.0.1"]);
    let relay = Relay::with_streams(&cert, &[]);
    let tcp = relay.addr_of("tcp").port().to_string();
    let tls = relay.addr_of("tls").port().to_string();
    let out = run_tool(
        "turnutils_uclient",
        &[
            "-t",
            "-y",
            "-u",
            "alice",
            "-w",
            "wonderland",
            "-p",
            &tcp,
            "-m",
            "4",
            "-n",
            "300",
            "-l",
            "120",
            "127.0.0.1",
        ],
        60,
    );
    assert_eq!(lost_packets(&out), 0, "TCP:\n{out}");
    // TLS client-to-client loses a little even against coturn; use a UDP peer as coturn's
    // own documentation does.
    let (_peer, peer_port) = common::turnutils_peer();
    let out = run_tool(
        "turnutils_uclient",
        &[
            "-S",
            "-t",
            "-u",
            "alice",
            "-w",
            "wonderland",
            "-p",
            &tls,
            "-e",
            "127.0.0.1",
            "-r",
            &peer_port.to_string(),
            "-m",
            "4",
            "-n",
            "300",
            "-l",
            "120",
            "127.0.0.1",
        ],
        60,
    );
    assert_eq!(lost_packets(&out), 0, "TLS:\n{out}");
    assert!(
        relay.wait_metric(
            "turnpike_relayed_packets_total{direction=\"peer_to_client\"}",
            2000.0
        ) >= 2000.0
    );
}

#[tokio::test]
async fn https_http_and_turn_share_one_tls_port() {
    let cert = TestCert::new("share", &["turn.test", "127.0.0.1"]);
    let relay = Relay::with_streams(&cert, &[]);
    let port = relay.addr_of("tls");

    // HTTPS as a browser or curl sends it: ALPN http/1.1 and h2.
    let tcp = TcpStream::connect(port).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("turn.test").expect("name");
    let mut tls = cert
        .connector(&[b"h2", b"http/1.1"])
        .connect(name.clone(), tcp)
        .await
        .expect("https handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: turn.test\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut body = String::new();
    tls.read_to_string(&mut body).await.expect("read");
    assert!(
        body.starts_with("HTTP/1.1 200") && body.ends_with("ok\n"),
        "{body}"
    );

    // HTTPS without ALPN, and plain HTTP, on the same port.
    let tcp = TcpStream::connect(port).await.expect("connect");
    let mut tls = cert
        .connector(&[])
        .connect(name.clone(), tcp)
        .await
        .expect("handshake");
    tls.write_all(b"GET /readyz HTTP/1.0\r\n\r\n")
        .await
        .expect("write");
    let mut body = String::new();
    tls.read_to_string(&mut body).await.expect("read");
    assert!(
        body.contains("200 OK") && body.ends_with("ready\n"),
        "{body}"
    );
    let (status, body) = common::http_get(port, "/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    // /metrics stays off the public port unless enabled.
    assert_eq!(common::http_get(port, "/metrics").0, 404);

    // TURN over TLS with ALPN stun.turn (RFC 7443) and without ALPN, and plain TURN over TCP.
    for alpn in [&[&b"stun.turn"[..]][..], &[]] {
        let tcp = TcpStream::connect(port).await.expect("connect");
        let mut tls = cert
            .connector(alpn)
            .connect(name.clone(), tcp)
            .await
            .expect("turn handshake");
        let mut c = RawClient::new(relay.udp, "alice", "wonderland");
        let r = c
            .request_on(&mut tls, method::ALLOCATE, |b| {
                b.u32(attr::REQUESTED_TRANSPORT, 17 << 24);
            })
            .await;
        assert_eq!(r.code(), None, "alpn {alpn:?}");
        assert_eq!(
            r.xor_addrs(attr::XOR_RELAYED_ADDRESS)[0].ip(),
            "127.0.0.1".parse::<std::net::IpAddr>().expect("ip")
        );
    }
    let mut tcp = TcpStream::connect(port).await.expect("connect");
    let (req, _) = binding(7);
    let r = stream_exchange(&mut tcp, &req).await;
    assert_eq!(r.code(), None);
    assert_eq!(
        r.xor_addrs(attr::XOR_MAPPED_ADDRESS),
        vec![tcp.local_addr().expect("addr")]
    );
}

#[tokio::test]
async fn tcp_allocation_relays_and_ends_with_its_connection() {
    let cert = TestCert::new("tcpalloc", &["turn.test"]);
    let relay = Relay::with_streams(&cert, &[]);
    let mut tcp = TcpStream::connect(relay.addr_of("tcp"))
        .await
        .expect("connect");
    let mut c = RawClient::new(relay.udp, "alice", "wonderland");
    let r = c
        .request_on(&mut tcp, method::ALLOCATE, |b| {
            b.u32(attr::REQUESTED_TRANSPORT, 17 << 24);
        })
        .await;
    assert_eq!(r.code(), None);
    let relayed = r.xor_addrs(attr::XOR_RELAYED_ADDRESS)[0];
    let peer = UdpSocket::bind("127.0.0.1:0").expect("peer");
    peer.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let peer_addr = peer.local_addr().expect("addr");
    let r = c
        .request_on(&mut tcp, method::CHANNEL_BIND, |b| {
            b.u32(attr::CHANNEL_NUMBER, 0x4001 << 16)
                .xor_address(attr::XOR_PEER_ADDRESS, peer_addr);
        })
        .await;
    assert_eq!(r.code(), None);
    // ChannelData of 5 bytes, padded to 8 on the stream.
    tcp.write_all(&[0x40, 0x01, 0, 5, b'h', b'e', b'l', b'l', b'o', 0, 0, 0])
        .await
        .expect("write");
    let mut buf = [0u8; 64];
    let (n, from) = peer.recv_from(&mut buf).expect("peer receives");
    assert_eq!((&buf[..n], from), (&b"hello"[..], relayed));
    peer.send_to(b"abc", relayed).expect("answer");
    let mut frame = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(3), tcp.read_exact(&mut frame))
        .await
        .expect("frame")
        .expect("read");
    assert_eq!(
        frame,
        [0x40, 0x01, 0, 3, b'a', b'b', b'c', 0],
        "padded ChannelData"
    );
    assert_eq!(relay.wait_metric("turnpike_allocations_active", 1.0), 1.0);
    drop(tcp);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while relay.metric("turnpike_allocations_active") > 0.0 && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        relay.metric("turnpike_allocations_active"),
        0.0,
        "closing the connection frees its allocation"
    );
}

#[tokio::test]
async fn proxy_protocol_names_the_real_client() {
    let relay = Relay::start(&[
        "--listen",
        "tcp://127.0.0.1:0?proxy-protocol",
        "--user",
        "alice:wonderland",
    ]);
    let addr = relay.addr_of("tcp");
    // v1
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(b"PROXY TCP4 198.51.100.9 127.0.0.1 5555 3478\r\n")
        .await
        .expect("header");
    let (req, _) = binding(1);
    let r = stream_exchange(&mut tcp, &req).await;
    assert_eq!(
        r.xor_addrs(attr::XOR_MAPPED_ADDRESS),
        vec!["198.51.100.9:5555".parse::<SocketAddr>().expect("a")]
    );
    // v2
    let header = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (
            "[2001:db8::7]:4444".parse::<SocketAddr>().expect("a"),
            "[2001:db8::1]:3478".parse::<SocketAddr>().expect("a"),
        ),
    )
    .build()
    .expect("v2 header");
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(&header).await.expect("header");
    let (req, _) = binding(2);
    let r = stream_exchange(&mut tcp, &req).await;
    assert_eq!(
        r.xor_addrs(attr::XOR_MAPPED_ADDRESS),
        vec!["[2001:db8::7]:4444".parse::<SocketAddr>().expect("a")]
    );
    // Without a header the connection is refused.
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(&binding(3).0).await.expect("write");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn sni_routes_web_hostnames_to_the_upstream_untouched() {
    // The existing website: its own TLS server with its own certificate.
    let web = TestCert::new("web", &["www.test"]);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let web_config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![rustls::pki_types::CertificateDer::from(web.der.clone())],
            <rustls::pki_types::PrivateKeyDer as rustls::pki_types::pem::PemObject>::from_pem_file(
                &web.key,
            )
            .expect("key"),
        )
        .expect("config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(web_config));
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let upstream_addr = upstream.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = upstream.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let _ = tls.read(&mut buf).await;
                let _ = tls.write_all(b"HTTP/1.0 200 OK\r\n\r\nthe website\n").await;
                let _ = tls.shutdown().await;
            });
        }
    });
    let turn = TestCert::new("turnsni", &["turn.test"]);
    let dir = turn.dir.clone();
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        format!(
            "listen = [\"tls://127.0.0.1:0\"]\nrealm = \"{REALM}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[https]\nupstream = \"{upstream_addr}\"\nweb_hostnames = [\"www.test\"]\n[auth]\nusers = [{{ name = \"alice\", password = \"wonderland\" }}]\n",
            turn.cert.display(),
            turn.key.display()
        ),
    )
    .expect("config");
    let relay = Relay::spawn(&[
        "--config",
        config.to_str().expect("path"),
        "--listen",
        "udp://127.0.0.1:0",
        "--listen",
        "tls://127.0.0.1:0",
        "--relay-ip",
        "127.0.0.1",
    ]);
    let port = relay.addr_of("tls");

    // www.test reaches the website, with the website's certificate.
    let tcp = TcpStream::connect(port).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("www.test").expect("name");
    let mut tls = web
        .connector(&[b"http/1.1"])
        .connect(name, tcp)
        .await
        .expect("website handshake");
    tls.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .await
        .expect("write");
    let mut body = String::new();
    let _ = tls.read_to_string(&mut body).await;
    assert!(body.ends_with("the website\n"), "{body}");

    // turn.test on the same port reaches the relay's own endpoints and TURN.
    let tcp = TcpStream::connect(port).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("turn.test").expect("name");
    let mut tls = turn
        .connector(&[b"http/1.1"])
        .connect(name.clone(), tcp)
        .await
        .expect("relay handshake");
    tls.write_all(b"GET /healthz HTTP/1.0\r\n\r\n")
        .await
        .expect("write");
    let mut body = String::new();
    let _ = tls.read_to_string(&mut body).await;
    assert!(body.ends_with("ok\n"), "{body}");
    let tcp = TcpStream::connect(port).await.expect("connect");
    let mut tls = turn
        .connector(&[b"stun.turn"])
        .connect(name, tcp)
        .await
        .expect("turn handshake");
    let mut c = RawClient::new(relay.udp, "alice", "wonderland");
    let r = c
        .request_on(&mut tls, method::ALLOCATE, |b| {
            b.u32(attr::REQUESTED_TRANSPORT, 17 << 24);
        })
        .await;
    assert_eq!(r.code(), None);
}

#[tokio::test]
async fn connections_per_ip_are_capped_and_idle_ones_closed() {
    let dir = std::env::temp_dir().join(format!("turnpike-limits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("relay.toml");
    std::fs::write(&config, "listen = [\"tcp://127.0.0.1:0\"]\n[tcp]\nmax_connections_per_ip = 2\nidle_timeout_secs = 1\n").expect("write");
    let relay = Relay::spawn(&[
        "--config",
        config.to_str().expect("path"),
        "--listen",
        "udp://127.0.0.1:0",
        "--listen",
        "tcp://127.0.0.1:0",
        "--relay-ip",
        "127.0.0.1",
    ]);
    let addr = relay.addr_of("tcp");
    let mut a = TcpStream::connect(addr).await.expect("a");
    let mut b = TcpStream::connect(addr).await.expect("b");
    // Both are served.
    for s in [&mut a, &mut b] {
        let (req, _) = binding(4);
        assert_eq!(stream_exchange(s, &req).await.code(), None);
    }
    // A third from the same address is closed at once.
    let mut c = TcpStream::connect(addr).await.expect("c");
    c.write_all(&binding(5).0).await.expect("write");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .expect("closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "third connection served");
    // Idle connections without an allocation are closed after idle_timeout_secs.
    let n = tokio::time::timeout(Duration::from_secs(5), a.read(&mut buf))
        .await
        .expect("idle close")
        .unwrap_or(0);
    assert_eq!(n, 0);
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[tokio::test]
async fn turn_over_tls_through_an_http_connect_proxy() {
    let cert = TestCert::new("proxy", &["turn.test", "127.0.0.1"]);
    let relay = Relay::with_streams(&cert, &[]);
    let tls_addr = relay.addr_of("tls");
    // A real proxy: tinyproxy on loopback, allowing CONNECT to the relay's TLS port only.
    let proxy_port = free_port();
    let conf = cert.dir.join("tinyproxy.conf");
    std::fs::write(
        &conf,
        format!("Port {proxy_port}\nListen 127.0.0.1\nAllow 127.0.0.1\nConnectPort {}\nMaxClients 10\nLogLevel Info\n", tls_addr.port()),
    )
    .expect("write");
    let _proxy = Child2(
        Command::new("tinyproxy")
            .args(["-d", "-c", conf.to_str().expect("path")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tinyproxy (.ci/run installs it)"),
    );
    let proxy: SocketAddr = format!("127.0.0.1:{proxy_port}").parse().expect("addr");
    let mut tcp = None;
    for _ in 0..100 {
        if let Ok(s) = TcpStream::connect(proxy).await {
            tcp = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut tcp = tcp.expect("tinyproxy listening");
    tcp.write_all(format!("CONNECT {tls_addr} HTTP/1.1\r\nHost: {tls_addr}\r\n\r\n").as_bytes())
        .await
        .expect("connect");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        tcp.read_exact(&mut b).await.expect("proxy answer");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    let name = rustls::pki_types::ServerName::try_from("turn.test").expect("name");
    let mut tls = cert
        .connector(&[])
        .connect(name, tcp)
        .await
        .expect("TLS through the proxy");
    let mut c = RawClient::new(relay.udp, "alice", "wonderland");
    let r = c
        .request_on(&mut tls, method::ALLOCATE, |b| {
            b.u32(attr::REQUESTED_TRANSPORT, 17 << 24);
        })
        .await;
    assert_eq!(r.code(), None);
    let relayed = r.xor_addrs(attr::XOR_RELAYED_ADDRESS)[0];
    let peer = UdpSocket::bind("127.0.0.1:0").expect("peer");
    peer.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let peer_addr = peer.local_addr().expect("addr");
    let r = c
        .request_on(&mut tls, method::CREATE_PERMISSION, |b| {
            b.xor_address(attr::XOR_PEER_ADDRESS, peer_addr);
        })
        .await;
    assert_eq!(r.code(), None);
    let mut ind = Vec::new();
    let tid = c.tid();
    Builder::new(&mut ind, Class::Indication, method::SEND, tid)
        .xor_address(attr::XOR_PEER_ADDRESS, peer_addr)
        .attr(attr::DATA, b"through the proxy");
    tls.write_all(&ind).await.expect("send");
    let mut buf = [0u8; 64];
    let (n, from) = peer.recv_from(&mut buf).expect("peer receives");
    assert_eq!((&buf[..n], from), (&b"through the proxy"[..], relayed));
}

#[test]
fn aioice_relays_over_udp_tcp_and_tls() {
    let cert = TestCert::new("aioice", &["turn.test", "127.0.0.1"]);
    let relay = Relay::with_streams(&cert, &[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/aioice_client.py");
    for (transport, addr) in [
        ("udp", relay.udp),
        ("tcp", relay.addr_of("tcp")),
        ("tls", relay.addr_of("tls")),
    ] {
        let port = addr.port().to_string();
        let out = run_tool(
            "python3",
            &[
                script,
                "127.0.0.1",
                &port,
                transport,
                "alice",
                "wonderland",
                cert.cert.to_str().expect("path"),
                "50",
            ],
            60,
        );
        let line = out.lines().find(|l| l.starts_with('{')).unwrap_or_else(|| {
            panic!("{transport}: aioice failed (.ci/run installs it with pip):\n{out}")
        });
        assert!(
            line.contains("\"sent\": 50, \"received\": 50"),
            "{transport}: {line}"
        );
        assert!(
            line.contains("\"relayed\": \"127.0.0.1:"),
            "{transport}: {line}"
        );
    }
}

#[tokio::test]
async fn sighup_and_file_changes_reload_without_dropping_allocations() {
    let first = TestCert::new("reload1", &["turn.test"]);
    let second = TestCert::new("reload2", &["turn.test"]);
    let config = first.dir.join("relay.toml");
    let cert = first.dir.join("live-cert.pem");
    let key = first.dir.join("live-key.pem");
    std::fs::copy(&first.cert, &cert).expect("cert");
    std::fs::copy(&first.key, &key).expect("key");
    let write_config = |password: &str, deny: &str| {
        std::fs::write(
            &config,
            format!(
                "realm = \"{REALM}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\n[auth]\nusers = [{{ name = \"alice\", password = \"{password}\" }}]\n[peer]\nallow = [\"127.0.0.0/8\"]\ndeny = [{deny}]\n",
                cert.display(),
                key.display()
            ),
        )
        .expect("config");
    };
    write_config("one", "");
    let relay = Relay::spawn(&[
        "--config",
        config.to_str().expect("path"),
        "--listen",
        "udp://127.0.0.1:0",
        "--listen",
        "tls://127.0.0.1:0",
        "--relay-ip",
        "127.0.0.1",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    // A live allocation with a channel to a peer.
    let mut live = RawClient::new(relay.udp, "alice", "one");
    let relayed = live.allocate().xor_addrs(attr::XOR_RELAYED_ADDRESS)[0];
    let peer = UdpSocket::bind("127.0.0.1:0").expect("peer");
    peer.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let peer_addr = peer.local_addr().expect("addr");
    let r = live.request(method::CHANNEL_BIND, |b| {
        b.u32(attr::CHANNEL_NUMBER, 0x4000 << 16)
            .xor_address(attr::XOR_PEER_ADDRESS, peer_addr);
    });
    assert_eq!(r.code(), None);
    let live_sock = live.sock.try_clone().expect("clone");
    // UDP may drop a datagram on a loaded machine: send again (bounded) until one arrives.
    peer.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let relays = |tag: u8| {
        for _ in 0..20 {
            live_sock
                .send_to(&[0x40, 0x00, 0, 1, tag], relay.udp)
                .expect("send");
            let mut buf = [0u8; 16];
            if let Ok((n, from)) = peer.recv_from(&mut buf) {
                if buf[..n] == [tag] {
                    return (buf[..n].to_vec(), from);
                }
            }
        }
        panic!("nothing relayed for {tag}:\n{}", relay.log_text());
    };
    assert_eq!(relays(1), (vec![1], relayed));

    // New password, and the peer's port denied, by SIGHUP.
    write_config("two", &format!("\"{}/32\"", peer_addr.ip()));
    relay.signal(libc::SIGHUP);
    relay.wait_for_log("trigger=\"SIGHUP\"");
    assert_eq!(
        RawClient::new(relay.udp, "alice", "one").allocate().code(),
        Some(401)
    );
    assert_eq!(
        RawClient::new(relay.udp, "alice", "two").allocate().code(),
        None
    );
    // The existing channel keeps relaying (the policy judges new permissions).
    assert_eq!(relays(2), (vec![2], relayed));
    // Its owner signs with the new password from now on; the allocation is the same.
    live.password = "two".into();
    let r = live.request(method::CREATE_PERMISSION, |b| {
        b.xor_address(attr::XOR_PEER_ADDRESS, peer_addr);
    });
    assert_eq!(
        r.code(),
        Some(403),
        "the reloaded deny rule applies to new permissions"
    );

    // A new certificate is picked up when the file changes, without a signal.
    let seen_cert = |c: &TestCert| {
        let connector = c.connector(&[b"http/1.1"]);
        let addr = relay.addr_of("tls");
        async move {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let name = rustls::pki_types::ServerName::try_from("turn.test").expect("name");
            connector.connect(name, tcp).await.is_ok()
        }
    };
    assert!(seen_cert(&first).await && !seen_cert(&second).await);
    std::fs::copy(&second.cert, &cert).expect("cert");
    std::fs::copy(&second.key, &key).expect("key");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !seen_cert(&second).await {
        assert!(
            std::time::Instant::now() < deadline,
            "new certificate not served:\n{}",
            relay.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(relays(3), (vec![3], relayed));

    // A broken file is refused and the running configuration stays.
    std::fs::write(&config, "realm = 7\n").expect("config");
    relay.signal(libc::SIGHUP);
    relay.wait_for_log("reload refused");
    assert_eq!(
        RawClient::new(relay.udp, "alice", "two").allocate().code(),
        None
    );
}

#[test]
fn coturn_uclient_over_rfc6062_tcp_allocations_loses_nothing() {
    let cert = TestCert::new("rfc6062", &["turn.test"]);
    let relay = Relay::with_streams(&cert, &[]);
    let tcp = relay.addr_of("tcp").port().to_string();
    // -T: TCP relaying; -y: the two clients Connect to each other's relayed TCP address, so
    // both Connect and ConnectionAttempt/ConnectionBind are exercised.
    let out = run_tool(
        "turnutils_uclient",
        &[
            "-T",
            "-y",
            "-u",
            "alice",
            "-w",
            "wonderland",
            "-p",
            &tcp,
            "-m",
            "2",
            "-n",
            "100",
            "-l",
            "120",
            "127.0.0.1",
        ],
        60,
    );
    assert_eq!(lost_packets(&out), 0, "{out}");
    assert!(out.contains("tot_recv_msgs=200"), "{out}");
}

#[tokio::test]
async fn tcp_allocations_obey_the_peer_policy() {
    let cert = TestCert::new("rfc6062policy", &["turn.test"]);
    // No --allow-peer here: loopback peers are refused.
    let relay = Relay::start(&[
        "--listen",
        "tcp://127.0.0.1:0",
        "--user",
        "alice:wonderland",
    ]);
    let tcp_transport = |b: &mut Builder<'_>| {
        b.u32(attr::REQUESTED_TRANSPORT, 6 << 24);
    };
    // Over UDP a TCP allocation is a bad request (RFC 6062 §5.1).
    assert_eq!(
        RawClient::new(relay.udp, "alice", "wonderland")
            .request(method::ALLOCATE, tcp_transport)
            .code(),
        Some(400)
    );
    let mut control = TcpStream::connect(relay.addr_of("tcp"))
        .await
        .expect("connect");
    let mut c = RawClient::new(relay.udp, "alice", "wonderland");
    let r = c
        .request_on(&mut control, method::ALLOCATE, tcp_transport)
        .await;
    assert_eq!(r.code(), None);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("peer");
    let peer = listener.local_addr().expect("addr");
    let r = c
        .request_on(&mut control, method::CONNECT, |b| {
            b.xor_address(attr::XOR_PEER_ADDRESS, peer);
        })
        .await;
    assert_eq!(r.code(), Some(403));
    listener.set_nonblocking(true).expect("nonblocking");
    assert!(
        listener.accept().is_err(),
        "the refused peer was connected to"
    );
    drop(cert);
}

#[test]
fn tls_listeners_speak_tls_1_2_and_1_3_only() {
    let cert = TestCert::new("versions", &["turn.test", "127.0.0.1"]);
    let relay = Relay::with_streams(&cert, &[]);
    let addr = relay.addr_of("tls").to_string();
    let handshake = |version: &str| {
        // `openssl s_client` reads stdin; give it none so it ends after the handshake.
        let out = Command::new("timeout")
            .args(["10", "openssl", "s_client", "-connect", &addr, version])
            .stdin(Stdio::null())
            .output()
            .expect("openssl");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    assert!(handshake("-tls1_3").contains("TLSv1.3"));
    assert!(handshake("-tls1_2").contains("TLSv1.2"));
    let old = handshake("-tls1_1");
    assert!(
        old.contains("no peer certificate available") && old.contains("Cipher is (NONE)"),
        "{old}"
    );
}

//! End-to-end tests of the echo services: UDP and TCP echo on ports and ranges (tagged
//! requests come back with the source address), the per-source rate limit, the WebSocket echo
//! and the long-poll echo (over plain HTTP on a tcp:// listener, on the metrics listener, and
//! behind PROXY protocol).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::{Relay, TestCert};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const UDP_PACKETS: &str = "turnpike_echo_packets_total{transport=\"udp\"}";
const UDP_DROPPED: &str = "turnpike_echo_dropped_total{transport=\"udp\"}";

/// A tagged request: `TPEQ`, a 12-byte sequence/timestamp, then filler.
fn tagged(len: usize, seq: u8) -> Vec<u8> {
    let mut b = vec![0x5A; len];
    b[..4].copy_from_slice(b"TPEQ");
    b[4..16].fill(seq);
    b
}

/// Checks a tagged reply to `request` sent from `from`.
fn assert_tagged_reply(reply: &[u8], request: &[u8], from: SocketAddr) {
    assert_eq!(reply.len(), request.len(), "same length");
    assert_eq!(&reply[..4], b"TPER");
    assert_eq!(
        &reply[4..16],
        &request[4..16],
        "sequence and timestamp kept"
    );
    let text = from.to_string();
    assert_eq!(
        &reply[16..16 + text.len()],
        text.as_bytes(),
        "source address: {:?}",
        String::from_utf8_lossy(&reply[16..])
    );
    assert!(reply[16 + text.len()..].iter().all(|&b| b == 0), "zeros");
}

fn udp_client() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s
}

/// Two consecutive ports free for both UDP and TCP a moment ago.
fn free_pair() -> u16 {
    for _ in 0..200 {
        let a = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let p = a.local_addr().expect("addr").port();
        if p == u16::MAX {
            continue;
        }
        let others = (
            UdpSocket::bind(("127.0.0.1", p + 1)),
            TcpListener::bind(("127.0.0.1", p)),
            TcpListener::bind(("127.0.0.1", p + 1)),
        );
        if let (Ok(_), Ok(_), Ok(_)) = others {
            return p;
        }
    }
    panic!("no two consecutive free ports");
}

#[test]
fn udp_echo_returns_the_source_address_and_plain_datagrams_unchanged() {
    let relay = Relay::start(&["--echo-udp", "127.0.0.1:0"]);
    let echo = relay.addr_of("echo-udp");
    let client = udp_client();
    let me = client.local_addr().expect("addr");
    let mut buf = [0u8; 2048];
    for (len, seq) in [(64, 1), (200, 2), (1200, 3)] {
        let req = tagged(len, seq);
        client.send_to(&req, echo).expect("send");
        let (n, from) = client.recv_from(&mut buf).expect("reply");
        assert_eq!(from, echo);
        assert_tagged_reply(&buf[..n], &req, me);
    }
    for req in [
        &b"hello"[..],
        &tagged(63, 4),
        &[0u8; 0][..],
        &[7u8; 500][..],
    ] {
        client.send_to(req, echo).expect("send");
        let (n, _) = client.recv_from(&mut buf).expect("reply");
        assert_eq!(&buf[..n], req, "echoed unchanged");
    }
    assert!(relay.wait_metric(UDP_PACKETS, 7.0) >= 7.0);
    assert_eq!(relay.metric(UDP_DROPPED), 0.0);
    // An echo reply is never answered: two echoes cannot ping-pong.
    client.send_to(b"TPER reply", echo).expect("send");
    relay.wait_metric(UDP_DROPPED, 1.0);
    assert_eq!(relay.metric(UDP_DROPPED), 1.0);
}

#[test]
fn port_ranges_from_the_file_and_the_flags() {
    let p = free_pair();
    let dir = std::env::temp_dir().join(format!("turnpike-echo-{}-{p}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        format!("[echo]\ntcp = [\"127.0.0.1:{p}-{}\"]\n", p + 1),
    )
    .expect("write");
    let range = format!("127.0.0.1:{p}-{}", p + 1);
    let relay = Relay::start(&[
        "--config",
        config.to_str().expect("path"),
        "--echo-udp",
        &range,
    ]);
    for port in [p, p + 1] {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        relay.wait_for_log(&format!("listening on echo-udp://{addr}"));
        relay.wait_for_log(&format!("listening on echo-tcp://{addr}"));
        let client = udp_client();
        let req = tagged(64, port as u8);
        client.send_to(&req, addr).expect("send");
        let mut buf = [0u8; 128];
        let (n, _) = client.recv_from(&mut buf).expect("reply");
        assert_tagged_reply(&buf[..n], &req, client.local_addr().expect("addr"));
        let mut tcp = TcpStream::connect(addr).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        tcp.write_all(b"ping").expect("write");
        let mut back = [0u8; 4];
        tcp.read_exact(&mut back).expect("echo");
        assert_eq!(&back, b"ping");
    }
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn tcp_echo_rewrites_aligned_tagged_blocks_and_echoes_the_rest() {
    let relay = Relay::start(&["--echo-tcp", "127.0.0.1:0"]);
    let echo = relay.addr_of("echo-tcp");
    let mut tcp = TcpStream::connect(echo).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let me = tcp.local_addr().expect("addr");
    let first = tagged(64, 1);
    // Written in pieces: the block is rewritten whatever the segmentation.
    tcp.write_all(&first[..10]).expect("write");
    tcp.flush().expect("flush");
    tcp.write_all(&first[10..]).expect("write");
    let mut block = [0u8; 64];
    tcp.read_exact(&mut block).expect("block");
    assert_tagged_reply(&block, &first, me);
    // Plain bytes come back unchanged; a tag that is not 64-byte aligned is left alone.
    let mut plain = b"hello, echo".to_vec();
    plain.extend(tagged(64, 2));
    tcp.write_all(&plain).expect("write");
    let mut back = vec![0u8; plain.len()];
    tcp.read_exact(&mut back).expect("plain");
    assert_eq!(back, plain);
    // The stream is now at offset 139; fill to 192, then an aligned tagged block, then a
    // partial block that the echo gives back unchanged once the client is quiet.
    let filler = vec![b'.'; 192 - 139];
    let second = tagged(64, 3);
    let partial = &tagged(64, 4)[..30];
    let mut more = filler.clone();
    more.extend_from_slice(&second);
    more.extend_from_slice(partial);
    tcp.write_all(&more).expect("write");
    let mut back = vec![0u8; more.len()];
    tcp.read_exact(&mut back).expect("more");
    assert_eq!(&back[..filler.len()], &filler[..]);
    assert_tagged_reply(&back[filler.len()..filler.len() + 64], &second, me);
    assert_eq!(&back[filler.len() + 64..], partial);
    // Closing our side: the echo closes too.
    tcp.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut rest = Vec::new();
    tcp.read_to_end(&mut rest).expect("eof");
    assert!(rest.is_empty());
    assert!(relay.wait_metric("turnpike_echo_packets_total{transport=\"tcp\"}", 1.0) >= 1.0);
}

#[test]
fn the_rate_limit_drops_the_excess_per_source() {
    let relay = Relay::start(&["--echo-udp", "127.0.0.1:0"]);
    let echo = relay.addr_of("echo-udp");
    let client = udp_client();
    client.set_nonblocking(true).expect("nonblocking");
    let req = [0x42u8; 100];
    let sent = 1000;
    let mut replies = 0;
    let mut buf = [0u8; 256];
    let mut drain = |replies: &mut u32| {
        while let Ok((n, _)) = client.recv_from(&mut buf) {
            assert_eq!(n, req.len());
            *replies += 1;
        }
    };
    // In batches small enough for any socket buffer, each one seen by the echo (answered or
    // dropped) before the next, so every datagram reaches the rate limit.
    for batch in 1..=sent / 50 {
        for _ in 0..50 {
            client.send_to(&req, echo).expect("send");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while relay.metric(UDP_PACKETS) + relay.metric(UDP_DROPPED) < f64::from(batch * 50) {
            assert!(
                Instant::now() < deadline,
                "the echo did not see batch {batch}"
            );
            drain(&mut replies);
        }
        drain(&mut replies);
    }
    let answered = relay.metric(UDP_PACKETS);
    client.set_nonblocking(false).expect("blocking");
    while f64::from(replies) < answered {
        // Blocks up to 5 s (the socket's timeout) for each missing answer.
        let Ok((n, _)) = client.recv_from(&mut buf) else {
            break;
        };
        assert_eq!(n, req.len());
        replies += 1;
    }
    assert!(replies > 0, "some replies");
    assert!(
        replies < sent,
        "{replies} replies to {sent} datagrams: not limited"
    );
    assert_eq!(f64::from(replies), answered, "every answer arrived");
    let dropped = relay.metric(UDP_DROPPED);
    assert!(dropped >= 1.0, "dropped metric did not move");
    assert_eq!(
        answered + dropped,
        f64::from(sent),
        "every datagram counted once"
    );
    // Off by default: no echo route on the HTTP endpoints.
    assert_eq!(relay.http_get("/echo/ws").0, 404);
    assert_eq!(relay.http_get("/echo/poll?hold=0").0, 404);
}

async fn ws_round_trips<S>(url: &str, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut ws, response) = tokio_tungstenite::client_async(url, stream)
        .await
        .expect("websocket handshake");
    assert_eq!(response.status(), 101);
    let messages = [
        Message::text("hello, echo"),
        Message::binary(vec![1u8, 2, 3, 0, 255]),
        Message::binary(vec![9u8; 64 << 10]),
    ];
    for m in messages {
        ws.send(m.clone()).await.expect("send");
        let back = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("reply in time")
            .expect("open")
            .expect("message");
        assert_eq!(back, m);
    }
    // A message over 64 KiB closes the socket. The relay may close it as soon as it reads the
    // frame's length, before the whole frame is written: then the send itself fails, and only
    // because the relay closed the connection (a reset or a broken pipe).
    if let Err(e) = ws.send(Message::binary(vec![1u8; (64 << 10) + 1])).await {
        use tokio_tungstenite::tungstenite::Error;
        let closed_by_relay = match &e {
            Error::Io(io) => matches!(
                io.kind(),
                std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
            ),
            Error::ConnectionClosed | Error::AlreadyClosed => true,
            _ => false,
        };
        assert!(closed_by_relay, "the oversized send failed otherwise: {e}");
        return;
    }
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("socket not closed");
    match end {
        None | Some(Err(_)) | Some(Ok(Message::Close(_))) => {}
        Some(Ok(m)) => panic!("echoed an oversized message: {} bytes", m.len()),
    }
}

#[tokio::test]
async fn websocket_echo_on_tcp_and_tls_listeners_and_the_metrics_listener() {
    let cert = TestCert::new("echo-ws", &["turn.test"]);
    let relay = Relay::start(&[
        "--listen",
        "tcp://127.0.0.1:0",
        "--listen",
        "tls://127.0.0.1:0",
        "--cert",
        cert.cert.to_str().expect("path"),
        "--key",
        cert.key.to_str().expect("path"),
        "--echo-websocket",
    ]);
    let tcp = relay.addr_of("tcp");
    let plain = tokio::net::TcpStream::connect(tcp).await.expect("connect");
    ws_round_trips(&format!("ws://{tcp}/echo/ws"), plain).await;
    let metrics = tokio::net::TcpStream::connect(relay.metrics)
        .await
        .expect("connect");
    ws_round_trips(&format!("ws://{}/echo/ws", relay.metrics), metrics).await;
    // wss:// on the TLS port that also carries TURN, as a browser would open it.
    let tls = tokio::net::TcpStream::connect(relay.addr_of("tls"))
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("turn.test").expect("name");
    let tls = cert
        .connector(&[b"http/1.1"])
        .connect(name, tls)
        .await
        .expect("tls handshake");
    ws_round_trips("wss://turn.test/echo/ws", tls).await;
    assert!(relay.wait_metric("turnpike_echo_packets_total{transport=\"websocket\"}", 9.0) >= 9.0);
}

/// A GET over a fresh connection (after `preamble`, e.g. a PROXY header); returns the status,
/// the body, our local address and how long the answer took.
fn timed_get(addr: SocketAddr, preamble: &[u8], path: &str) -> (u16, String, SocketAddr, Duration) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let me = s.local_addr().expect("addr");
    let start = Instant::now();
    s.write_all(preamble).expect("preamble");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: echo.test\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let took = start.elapsed();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_owned())
        .unwrap_or_default();
    (status, body, me, took)
}

fn held_ms(body: &str) -> u64 {
    body.split("\"held_ms\": ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no held_ms in {body:?}"))
}

#[test]
fn long_poll_holds_the_requested_time_capped_by_the_configuration() {
    let relay = Relay::start(&[
        "--listen",
        "tcp://127.0.0.1:0",
        "--listen",
        "tcp://127.0.0.1:0?proxy-protocol",
        "--echo-long-poll-max",
        "1",
    ]);
    let plain = relay.addr_of("tcp");
    let proxied: SocketAddr = relay
        .wait_for_log("(PROXY protocol)")
        .split("tcp://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .expect("proxy listener address");
    let metrics = relay.metrics;
    let capped = std::thread::spawn(move || timed_get(metrics, b"", "/echo/poll?hold=60"));
    let behind_proxy = std::thread::spawn(move || {
        timed_get(
            proxied,
            b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 3478\r\n",
            "/echo/poll?hold=0",
        )
    });

    // Upper bounds here tell a hold of seconds from the 60 s asked for, not how fast the
    // machine is: a loaded one may answer late, never early.
    let (status, body, me, took) = timed_get(plain, b"", "/echo/poll?hold=1");
    assert_eq!(status, 200, "{body}");
    assert!(took >= Duration::from_secs(1), "answered after {took:?}");
    assert!((1000..30_000).contains(&held_ms(&body)), "{body}");
    assert!(body.contains(&format!("\"client\": \"{me}\"")), "{body}");

    let (status, body, me, took) = capped.join().expect("capped");
    assert_eq!(status, 200, "{body}");
    assert!(took >= Duration::from_secs(1), "capped hold took {took:?}");
    assert!(took < Duration::from_secs(30), "not capped: {took:?}");
    assert!(body.contains(&format!("\"client\": \"{me}\"")), "{body}");

    let (status, body, _, _) = behind_proxy.join().expect("proxied");
    assert_eq!(status, 200, "{body}");
    assert!(held_ms(&body) < 1000, "{body}");
    assert!(
        body.contains("\"client\": \"198.51.100.7:40000\""),
        "the PROXY header's client: {body}"
    );
    assert_eq!(timed_get(plain, b"", "/echo/poll?hold=x").0, 400);
    assert!(relay.wait_metric("turnpike_echo_packets_total{transport=\"long_poll\"}", 3.0) >= 3.0);
}

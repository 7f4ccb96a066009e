//! Probing one region over every path it offers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::bandwidth::{self, Bandwidth};
use crate::capture::{PathCapture, TapStream};
use crate::inspect;
use crate::regions::Region;
use crate::select::{PathResult, PeerCheck};
use crate::turn::{Conn, Failure, Stream, TurnClient};

/// How to probe.
#[derive(Debug, Clone)]
pub struct Options {
    /// Samples per path.
    pub samples: usize,
    /// Pause between samples.
    pub interval: Duration,
    /// Longest wait for one answer, or one connection.
    pub timeout: Duration,
    /// HTTP CONNECT proxy for the `turn-tls-proxy` path.
    pub proxy: Option<Proxy>,
    /// Say on stderr which path is being probed (a blocked path waits for its timeouts).
    pub progress: bool,
    /// Record every packet (`measure --capture`).
    pub capture: Option<std::sync::Arc<crate::capture::Capture>>,
    /// `measure --bandwidth`: bits per second and seconds, over each TURN path.
    pub bandwidth: Option<(f64, u64)>,
}

impl Options {
    /// Where a path records its packets, when capturing.
    fn tap(&self, region: &Region, path: &str) -> Option<PathCapture> {
        self.capture.as_ref().map(|c| c.path(&region.name, path))
    }
}

/// `http://[user:pass@]host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxy {
    pub host: String,
    pub port: u16,
    pub auth: Option<String>,
}

impl std::str::FromStr for Proxy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("http://")
            .ok_or_else(|| format!("{s:?}: expected http://[user:pass@]host:port"))?;
        let rest = rest.trim_end_matches('/');
        let (auth, hostport) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a.to_owned()), h),
            None => (None, rest),
        };
        let (host, port) = hostport
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?}: missing port"))?;
        let port = port.parse().map_err(|_| format!("{s:?}: bad port"))?;
        Ok(Proxy {
            host: host.trim_matches(['[', ']']).to_owned(),
            port,
            auth,
        })
    }
}

/// The credentials to use: static, or minted now from the shared secret (valid one hour).
pub fn credentials(region: &Region) -> (String, String) {
    match (&region.secret, &region.username, &region.password) {
        (Some(secret), user, _) => {
            ephemeral_credentials(secret, user.as_deref().unwrap_or("probe"), 3600)
        }
        (None, Some(u), Some(p)) => (u.clone(), p.clone()),
        _ => (String::new(), String::new()),
    }
}

/// coturn-style ephemeral credentials from a shared secret: `expiry:user` and its
/// base64 HMAC-SHA1, valid for `secs` from now.
pub fn ephemeral_credentials(secret: &str, user: &str, secs: u64) -> (String, String) {
    let expiry = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + secs;
    let username = turnpike_proto::auth::ephemeral_username(expiry, Some(user));
    let password = turnpike_proto::auth::ephemeral_password(secret, &username);
    (username, password)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr, Failure> {
    let mut addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| Failure::Dns(format!("{host}: {e}")))?;
    addrs
        .next()
        .ok_or_else(|| Failure::Dns(format!("{host}: no address")))
}

async fn udp_to(addr: SocketAddr) -> Result<UdpSocket, Failure> {
    let local: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .map_err(|_| Failure::Other("addr".into()))?;
    let s = UdpSocket::bind(local)
        .await
        .map_err(|e| Failure::io("bind", e))?;
    s.connect(addr)
        .await
        .map_err(|e| Failure::io("connect", e))?;
    Ok(s)
}

async fn tcp_to(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, Failure> {
    let s = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| Failure::Timeout(format!("TCP connect to {addr}")))?
        .map_err(|e| Failure::io(&format!("TCP connect to {addr}"), e))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// A TLS client for the region: its own CA when given, else the public web roots.
/// A TLS connector for `region`, and the verifier that notes the certificate each handshake
/// is shown (TLS inspection is told from it).
pub fn tls_connector(
    region: &Region,
) -> Result<(tokio_rustls::TlsConnector, Arc<inspect::Verifier>), Failure> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match &region.ca_file {
        Some(path) => {
            for cert in rustls::pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| Failure::Tls(format!("ca_file {}: {e}", path.display())))?
            {
                let cert =
                    cert.map_err(|e| Failure::Tls(format!("ca_file {}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| Failure::Tls(format!("ca_file {}: {e}", path.display())))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .build()
    .map_err(|e| Failure::Tls(e.to_string()))?;
    let verifier = inspect::Verifier::new(webpki, region.tls_spki.clone());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Failure::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::clone(&verifier) as _)
        .with_no_client_auth();
    Ok((tokio_rustls::TlsConnector::from(Arc::new(config)), verifier))
}

/// What a path learnt on the way, whether it then failed or not: the TLS certificate it was
/// shown, and whether a TCP connection was accepted (directly, or by the proxy's CONNECT).
#[derive(Default)]
struct Trail {
    seen: std::cell::RefCell<Option<inspect::Seen>>,
    connected: std::cell::Cell<bool>,
}

/// TLS over an established stream; returns the stream and the handshake time. The
/// certificate shown goes into `seen`, whether it was trusted or not.
async fn tls_over<S>(
    region: &Region,
    tcp: S,
    alpn: &[&[u8]],
    timeout: Duration,
    trail: &Trail,
) -> Result<(Box<dyn Stream>, f64), Failure>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (connector, verifier) = tls_connector(region)?;
    let connector = if alpn.is_empty() {
        connector
    } else {
        let mut config = rustls::ClientConfig::clone(connector.config());
        config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    };
    let name = rustls::pki_types::ServerName::try_from(region.tls_name().to_owned())
        .map_err(|e| Failure::Tls(format!("{}: {e}", region.tls_name())))?;
    let start = Instant::now();
    let result = tokio::time::timeout(timeout, connector.connect(name, tcp)).await;
    *trail.seen.borrow_mut() = verifier.last_seen();
    let tls = result
        .map_err(|_| Failure::Timeout("no answer to the TLS handshake".into()))?
        .map_err(|e| {
            use std::io::ErrorKind::{ConnectionAborted, ConnectionReset, UnexpectedEof};
            let refused = verifier.last_error();
            // Cut during the handshake (a firewall that reads the server name, say).
            if refused.is_none()
                && matches!(
                    e.kind(),
                    ConnectionReset | ConnectionAborted | UnexpectedEof
                )
            {
                return Failure::Reset(format!("TLS handshake: {e}"));
            }
            inspect::diagnose(
                &e,
                refused.as_ref(),
                region.tls_name(),
                trail.seen.borrow().as_ref(),
            )
        })?;
    Ok((Box::new(tls), ms(start.elapsed())))
}

/// A TCP connection to `host:port` through an HTTP CONNECT proxy.
pub async fn connect_via_proxy(
    proxy: &Proxy,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, Failure> {
    let at = format!("{}:{}", proxy.host, proxy.port);
    let addr = resolve(&proxy.host, proxy.port)
        .await
        .map_err(|e| Failure::ProxyUnreachable(format!("the proxy {at}: {e}")))?;
    let mut tcp = tcp_to(addr, timeout)
        .await
        .map_err(|e| Failure::ProxyUnreachable(format!("the proxy {at}: {e}")))?;
    let mut request = format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n");
    if let Some(auth) = &proxy.auth {
        use base64::Engine;
        request += &format!(
            "Proxy-Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(auth)
        );
    }
    request += "\r\n";
    tcp.write_all(request.as_bytes())
        .await
        .map_err(|e| Failure::Proxy(0, format!("the proxy {at} took no request: {e}")))?;
    let mut head = Vec::new();
    let read = async {
        while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
            let mut b = [0u8; 1];
            let n = tcp.read(&mut b).await.map_err(|e| {
                Failure::Proxy(0, format!("the proxy {at} cut the connection: {e}"))
            })?;
            if n == 0 {
                return Err(Failure::Proxy(
                    0,
                    format!("the proxy {at} closed the connection without answering CONNECT"),
                ));
            }
            head.push(b[0]);
        }
        Ok(())
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| Failure::Proxy(0, format!("the proxy {at} did not answer CONNECT")))??;
    let head = String::from_utf8_lossy(&head);
    let status = head.lines().next().unwrap_or("").to_owned();
    let code = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    if code != 200 {
        return Err(Failure::Proxy(
            code,
            format!("CONNECT {host}:{port} refused: {status}"),
        ));
    }
    Ok(tcp)
}

/// Every path of one region, in a fixed order.
pub async fn probe_region(region: &Region, opts: &Options) -> Vec<PathResult> {
    let mut out = Vec::new();
    let progress = |path: &str| {
        if opts.progress {
            eprintln!(
                "turnpike-probe: {} {path}: probing ({} samples, up to {} ms each)",
                region.name,
                opts.samples,
                opts.timeout.as_millis()
            );
        }
    };
    if region.udp_port != 0 {
        progress("stun-udp");
        out.push(stun_udp(region, opts).await);
        progress("turn-udp");
        out.push(turn_path(region, opts, "turn-udp").await);
    }
    if region.tcp_port != 0 {
        progress("turn-tcp");
        out.push(turn_path(region, opts, "turn-tcp").await);
    }
    if region.tls_port != 0 {
        progress("turn-tls");
        out.push(turn_path(region, opts, "turn-tls").await);
        if opts.proxy.is_some() {
            progress("turn-tls-proxy");
            out.push(turn_path(region, opts, "turn-tls-proxy").await);
        }
        if region.websocket {
            progress("websocket");
            out.push(websocket(region, opts).await);
        }
    }
    for spec in &region.echo_udp {
        for port in spec.ports().unwrap_or_default() {
            progress(&format!("echo-udp:{port}"));
            out.push(echo_udp(region, opts, port).await);
        }
    }
    for spec in &region.echo_tcp {
        for port in spec.ports().unwrap_or_default() {
            progress(&format!("echo-tcp:{port}"));
            out.push(echo_tcp(region, opts, port).await);
        }
    }
    out
}

async fn stun_udp(region: &Region, opts: &Options) -> PathResult {
    let result = PathResult::new(&region.name, "stun-udp");
    let tap = opts.tap(region, "stun-udp");
    let run = async {
        let addr = resolve(&region.host, region.udp_port).await?;
        let mut client =
            TurnClient::new(Conn::Udp(udp_to(addr).await?), "", "").tapped(tap.as_ref());
        let mut samples = Vec::new();
        let mut mapped = None;
        let mut last_error = None;
        for i in 0..opts.samples {
            if i > 0 {
                tokio::time::sleep(opts.interval).await;
            }
            let start = Instant::now();
            match client.binding(opts.timeout).await {
                Ok(m) => {
                    samples.push(ms(start.elapsed()));
                    mapped = Some(m.to_string());
                }
                Err(e) => last_error = Some(e),
            }
        }
        Ok::<_, Failure>((samples, mapped, last_error))
    };
    match run.await {
        Ok((samples, mapped, last_error)) => {
            let mut r = result;
            r.mapped = mapped;
            if samples.is_empty() {
                r.error = last_error.as_ref().map(|e| e.to_string());
                r.failure = last_error;
            }
            r.with_samples(&samples, opts.samples)
        }
        Err(e) => result.failed(e),
    }
}

/// Opens the control connection a TURN path uses; returns it and the TLS handshake time.
async fn turn_conn(
    region: &Region,
    opts: &Options,
    path: &str,
    tap: Option<&PathCapture>,
    trail: &Trail,
) -> Result<(Conn, Option<f64>), Failure> {
    match path {
        "turn-udp" => Ok((
            Conn::Udp(udp_to(resolve(&region.host, region.udp_port).await?).await?),
            None,
        )),
        "turn-tcp" => {
            let tcp = tcp_to(resolve(&region.host, region.tcp_port).await?, opts.timeout).await?;
            trail.connected.set(true);
            Ok((Conn::Stream(Box::new(TapStream::tcp(tcp, tap))), None))
        }
        "turn-tls" => {
            let tcp = tcp_to(resolve(&region.host, region.tls_port).await?, opts.timeout).await?;
            trail.connected.set(true);
            let tcp = TapStream::tcp(tcp, tap);
            let (tls, t) = tls_over(region, tcp, &[b"stun.turn"], opts.timeout, trail).await?;
            Ok((Conn::Stream(tls), Some(t)))
        }
        _ => {
            let proxy = opts
                .proxy
                .as_ref()
                .ok_or_else(|| Failure::Other("no proxy".into()))?;
            let tcp = connect_via_proxy(proxy, &region.host, region.tls_port, opts.timeout).await?;
            trail.connected.set(true);
            // Recorded from the TLS handshake on (the CONNECT exchange before it is not).
            let tcp = TapStream::tcp(tcp, tap);
            let (tls, t) = tls_over(region, tcp, &[b"stun.turn"], opts.timeout, trail).await?;
            Ok((Conn::Stream(tls), Some(t)))
        }
    }
}

/// Allocations a TURN path makes at most for its second one while the relay gives it the
/// first one's relayed address.
const SAME_RELAYED_TRIES: u32 = 4;

/// A TURN path: allocation time, then the relayed round trip between two allocations of the
/// same relay (the first sends to the second's relayed address, through the relay).
async fn turn_path(region: &Region, opts: &Options, path: &str) -> PathResult {
    let mut result = PathResult::new(&region.name, path);
    let tap = opts.tap(region, path);
    let (user, pass) = credentials(region);
    // Whether the host was reached: a TCP connection accepted, or any answer from the relay.
    let reached = std::cell::Cell::new(false);
    let trail = Trail::default();
    let run = async {
        let (conn_a, tls_ms) = turn_conn(region, opts, path, tap.as_ref(), &trail).await?;
        let mut a = TurnClient::new(conn_a, &user, &pass).tapped(tap.as_ref());
        let start = Instant::now();
        let (relayed_a, mapped) = a.allocate(opts.timeout).await?;
        reached.set(true);
        let alloc_ms = ms(start.elapsed());
        // A relay with shared relay ports may give the second allocation the first one's
        // relayed address (one port per thread): the two could not reach each other, so the
        // second allocates again from another source port, which may reach another thread.
        let mut tries = 0;
        let (mut b, relayed_b) = loop {
            tries += 1;
            let (conn_b, _) = turn_conn(region, opts, path, tap.as_ref(), &trail).await?;
            let mut b = TurnClient::new(conn_b, &user, &pass).tapped(tap.as_ref());
            match b.allocate(opts.timeout).await {
                Ok((r, _)) if r == relayed_a && tries < SAME_RELAYED_TRIES => b.release().await,
                Ok((r, _)) if r == relayed_a => {
                    b.release().await;
                    a.release().await;
                    return Err(Failure::Other(format!(
                        "{tries} allocations all got the relayed address {r}: the relay shares \
                         one port per thread (shared_relay_ports = 1), where two of its clients \
                         cannot reach each other; set 2 or more"
                    )));
                }
                Ok((r, _)) => break (b, r),
                Err(e) => {
                    a.release().await;
                    return Err(e);
                }
            }
        };
        let permitted = async {
            a.permit(relayed_b, opts.timeout).await?;
            b.permit(relayed_a, opts.timeout).await
        };
        let outcome = match permitted.await {
            Ok(()) => {
                let mut samples = Vec::new();
                for i in 0..opts.samples {
                    if i > 0 {
                        tokio::time::sleep(opts.interval).await;
                    }
                    let payload = (i as u64).to_be_bytes();
                    let start = Instant::now();
                    a.send_to(relayed_b, &payload).await?;
                    let deadline = start + opts.timeout;
                    while let Ok(data) = b.recv_data(deadline).await {
                        if data == payload {
                            samples.push(ms(start.elapsed()));
                            break;
                        }
                    }
                }
                let bandwidth = match opts.bandwidth {
                    Some((bps, secs)) => Some(
                        bandwidth_test(&mut a, &mut b, relayed_b, bps, secs, opts.timeout).await,
                    ),
                    None => None,
                };
                let peer = match (path, resolve(&region.host, region.udp_port).await) {
                    ("turn-udp", Ok(server)) => {
                        Some(peer_check(&mut b, relayed_b, server, opts, tap.as_ref()).await)
                    }
                    _ => None,
                };
                Ok((samples, bandwidth, peer))
            }
            Err(e) => Err(e),
        };
        a.release().await;
        b.release().await;
        Ok::<_, Failure>((tls_ms, alloc_ms, mapped, outcome?))
    };
    let outcome = run.await;
    reached.set(reached.get() || trail.connected.get());
    result.tls_certificate = trail.seen.into_inner();
    match outcome {
        Ok((tls_ms, alloc_ms, mapped, (samples, bandwidth, peer))) => {
            result.bandwidth = bandwidth;
            result.peer = peer;
            result.tls_handshake_ms = tls_ms;
            result.allocation_ms = Some(alloc_ms);
            result.mapped = mapped.map(|m| m.to_string());
            result.reached = true;
            let r = result.with_samples(&samples, opts.samples);
            let median = r.rtt_ms.map(|x| x.median);
            PathResult {
                relay_rtt_ms: median,
                ..r
            }
        }
        Err(e) => {
            let mut r = result.failed(e);
            r.reached = reached.get();
            r
        }
    }
}

/// Datagrams each direction of [`peer_check`] sends before it gives up.
const PEER_TRIES: u32 = 2;

/// A peer that does not use TURN, where the probe runs: a plain UDP socket learns the address
/// the relay sees it at (a Binding to `server`, the relay's UDP listener), `b` permits that
/// exact endpoint (a relay with shared relay ports delivers only the endpoints an allocation
/// named), the socket sends to `b`'s relayed address, and `b` answers it from there. This
/// crosses the relay ports the way a peer's media does.
async fn peer_check(
    b: &mut TurnClient,
    relayed_b: SocketAddr,
    server: SocketAddr,
    opts: &Options,
    tap: Option<&PathCapture>,
) -> PeerCheck {
    let mut check = PeerCheck {
        relayed: relayed_b.to_string(),
        ..Default::default()
    };
    let run = async {
        let mut stun = TurnClient::new(Conn::Udp(udp_to(server).await?), "", "").tapped(tap);
        let mapped = stun.binding(opts.timeout).await?;
        check.seen_as = Some(mapped.to_string());
        let sock = stun
            .into_udp()
            .ok_or_else(|| Failure::Other("no UDP socket".into()))?;
        sock.connect(relayed_b)
            .await
            .map_err(|e| Failure::io("connect", e))?;
        let tap = match (tap, sock.local_addr()) {
            (Some(p), Ok(local)) => Some(p.udp(local, relayed_b)),
            _ => None,
        };
        b.permit(mapped, opts.timeout).await?;
        // From here to the relayed address: the relay hands it to `b` with its source.
        let mut source = None;
        for i in 0..PEER_TRIES {
            let hello = format!("turnpike-probe peer {i}").into_bytes();
            sock.send(&hello)
                .await
                .map_err(|e| Failure::io("send", e))?;
            if let Some(t) = &tap {
                t.sent(&hello);
            }
            let deadline = Instant::now() + opts.timeout;
            while let Ok((from, data)) = b.recv_data_from(deadline).await {
                if data == hello {
                    source = from;
                    break;
                }
            }
            if source.is_some() {
                break;
            }
        }
        let Some(source) = source else {
            return Err(Failure::Timeout(format!(
                "datagrams from here to the relayed address {relayed_b} did not arrive"
            )));
        };
        check.inbound = true;
        // And back: the relay sends from the relayed address to where the peer was seen.
        let mut buf = vec![0u8; 2048];
        for i in 0..PEER_TRIES {
            let answer = format!("turnpike-probe answer {i}").into_bytes();
            b.send_to(source, &answer).await?;
            let got = tokio::time::timeout(opts.timeout, async {
                loop {
                    match sock.recv(&mut buf).await {
                        Ok(n) if buf[..n] == answer[..] => return true,
                        Ok(n) => {
                            if let Some(t) = &tap {
                                t.received(relayed_b, &buf[..n]);
                            }
                        }
                        Err(_) => return false,
                    }
                }
            })
            .await
            .unwrap_or(false);
            if got {
                if let Some(t) = &tap {
                    t.received(relayed_b, &answer);
                }
                check.outbound = true;
                return Ok(());
            }
        }
        Err(Failure::Timeout(format!(
            "the answers from the relayed address {relayed_b} did not get back in"
        )))
    };
    if let Err(e) = run.await {
        check.error = Some(e.to_string());
    }
    check
}

/// Sends paced datagrams from `a` to `to` (the relayed address of `b`) at `bps` for `secs`,
/// counting what reaches `b` (see [`crate::bandwidth`]).
async fn bandwidth_test(
    a: &mut TurnClient,
    b: &mut TurnClient,
    to: SocketAddr,
    bps: f64,
    secs: u64,
    timeout: Duration,
) -> Bandwidth {
    let (count, gap) = bandwidth::plan(bps, secs);
    let base = Instant::now();
    // The sender stops at the end of the window even when the path (a TCP connection's
    // backpressure, say) held it back: what did not leave in time is not sent, and the rate is
    // what arrived in the window.
    let window_end = base + Duration::from_secs(secs);
    let send = async {
        let mut sent = 0;
        for seq in 0..count {
            tokio::time::sleep_until((base + gap.mul_f64(seq as f64)).into()).await;
            if Instant::now() >= window_end {
                break;
            }
            let packet = bandwidth::payload(seq as u32, base);
            match tokio::time::timeout(timeout, a.send_to(to, &packet)).await {
                Ok(Ok(())) => sent += 1,
                _ => break,
            }
        }
        sent
    };
    let receive = async {
        let end = base + Duration::from_secs(secs) + timeout;
        let mut seen = vec![false; count];
        let (mut arrivals, mut rtts) = (Vec::new(), Vec::new());
        while arrivals.len() < count {
            let Ok(data) = b.recv_data(end).await else {
                break;
            };
            let Some((seq, sent_us)) = bandwidth::parse_payload(&data) else {
                continue;
            };
            if let Some(s) = seen.get_mut(seq as usize).filter(|s| !**s) {
                *s = true;
                let now_us = base.elapsed().as_micros() as u64;
                arrivals.push(now_us);
                rtts.push(now_us.saturating_sub(sent_us) as f64 / 1000.0);
            }
        }
        (arrivals, rtts)
    };
    let (sent, (arrivals, mut rtts)) = tokio::join!(send, receive);
    let limit = [a.bandwidth_limit(), b.bandwidth_limit()]
        .into_iter()
        .flatten()
        .min();
    bandwidth::summarize(bps, secs, sent, &arrivals, &mut rtts, limit)
}

/// A 64-byte echo request: `TPEQ`, sequence number, then padding the echo overwrites.
fn echo_request(seq: u32) -> [u8; 64] {
    let mut b = [0u8; 64];
    b[..4].copy_from_slice(b"TPEQ");
    b[4..8].copy_from_slice(&seq.to_be_bytes());
    b
}

/// The address text an echo wrote into its reply, if it did.
fn echo_mapped(reply: &[u8]) -> Option<String> {
    if reply.len() < 17 || &reply[..4] != b"TPER" {
        return None;
    }
    let text = &reply[16..];
    let end = text.iter().position(|b| *b == 0).unwrap_or(text.len());
    std::str::from_utf8(&text[..end]).ok().map(str::to_owned)
}

async fn echo_udp(region: &Region, opts: &Options, port: u16) -> PathResult {
    let result = PathResult::new(&region.name, &format!("echo-udp:{port}"));
    let tap = opts.tap(region, &format!("echo-udp:{port}"));
    let run = async {
        let sock = udp_to(resolve(&region.host, port).await?).await?;
        let udp_tap = match (&tap, sock.local_addr(), sock.peer_addr()) {
            (Some(t), Ok(l), Ok(r)) => Some(t.udp(l, r)),
            _ => None,
        };
        let mut samples = Vec::new();
        let mut mapped = None;
        let mut last_error = None;
        for i in 0..opts.samples {
            if i > 0 {
                tokio::time::sleep(opts.interval).await;
            }
            let req = echo_request(i as u32);
            let start = Instant::now();
            sock.send(&req).await.map_err(|e| Failure::io("send", e))?;
            if let Some(t) = &udp_tap {
                t.sent(&req);
            }
            let deadline = start + opts.timeout;
            loop {
                let mut buf = [0u8; 128];
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, sock.recv(&mut buf)).await {
                    Err(_) => {
                        last_error = Some(Failure::Timeout(
                            "no echo: UDP blocked, or replies do not get back in".into(),
                        ));
                        break;
                    }
                    Ok(Err(e)) => {
                        last_error = Some(Failure::io("echo", e));
                        break;
                    }
                    Ok(Ok(n)) => {
                        if let (Some(t), Ok(from)) = (&udp_tap, sock.peer_addr()) {
                            t.received(from, &buf[..n]);
                        }
                        if n >= 8 && buf[4..8] == req[4..8] {
                            samples.push(ms(start.elapsed()));
                            mapped = echo_mapped(&buf[..n]);
                            break;
                        }
                    }
                }
            }
        }
        Ok::<_, Failure>((samples, mapped, last_error))
    };
    match run.await {
        Ok((samples, mapped, last_error)) => {
            let mut r = result;
            r.mapped = mapped;
            if samples.is_empty() {
                r.error = last_error.as_ref().map(|e| e.to_string());
                r.failure = last_error;
            }
            r.with_samples(&samples, opts.samples)
        }
        Err(e) => result.failed(e),
    }
}

async fn echo_tcp(region: &Region, opts: &Options, port: u16) -> PathResult {
    let result = PathResult::new(&region.name, &format!("echo-tcp:{port}"));
    let tap = opts.tap(region, &format!("echo-tcp:{port}"));
    let reached = std::cell::Cell::new(false);
    let run = async {
        let mut tcp = TapStream::tcp(
            tcp_to(resolve(&region.host, port).await?, opts.timeout).await?,
            tap.as_ref(),
        );
        reached.set(true);
        let mut samples = Vec::new();
        let mut mapped = None;
        for i in 0..opts.samples {
            if i > 0 {
                tokio::time::sleep(opts.interval).await;
            }
            let req = echo_request(i as u32);
            let start = Instant::now();
            tcp.write_all(&req)
                .await
                .map_err(|e| Failure::io("write", e))?;
            let mut reply = [0u8; 64];
            tokio::time::timeout(opts.timeout, tcp.read_exact(&mut reply))
                .await
                .map_err(|_| Failure::Timeout("no echo".into()))?
                .map_err(|e| Failure::io("read", e))?;
            samples.push(ms(start.elapsed()));
            mapped = echo_mapped(&reply);
        }
        Ok::<_, Failure>((samples, mapped))
    };
    match run.await {
        Ok((samples, mapped)) => {
            let mut r = result;
            r.mapped = mapped;
            r.with_samples(&samples, opts.samples)
        }
        Err(e) => {
            let mut r = result.failed(e);
            r.reached = reached.get();
            r
        }
    }
}

/// The WebSocket echo at `/echo/ws` over TLS on the TLS port (through the proxy when one is
/// given, as a browser behind it would go).
async fn websocket(region: &Region, opts: &Options) -> PathResult {
    let mut result = PathResult::new(&region.name, "websocket");
    let tap = opts.tap(region, "websocket");
    let trail = Trail::default();
    let run = async {
        let tcp = match &opts.proxy {
            Some(p) => connect_via_proxy(p, &region.host, region.tls_port, opts.timeout).await?,
            None => tcp_to(resolve(&region.host, region.tls_port).await?, opts.timeout).await?,
        };
        let tcp = TapStream::tcp(tcp, tap.as_ref());
        trail.connected.set(true);
        let (tls, tls_ms) = tls_over(region, tcp, &[b"http/1.1"], opts.timeout, &trail).await?;
        let url = format!("wss://{}:{}/echo/ws", region.tls_name(), region.tls_port);
        let (mut ws, _) =
            tokio::time::timeout(opts.timeout, tokio_tungstenite::client_async(url, tls))
                .await
                .map_err(|_| Failure::Timeout("WebSocket upgrade".into()))?
                .map_err(|e| Failure::Other(format!("WebSocket upgrade refused: {e}")))?;
        let mut samples = Vec::new();
        for i in 0..opts.samples {
            if i > 0 {
                tokio::time::sleep(opts.interval).await;
            }
            let text = format!("probe {i}");
            let start = Instant::now();
            ws.send(WsMessage::text(text.clone()))
                .await
                .map_err(|e| Failure::Other(e.to_string()))?;
            let reply = tokio::time::timeout(opts.timeout, ws.next())
                .await
                .map_err(|_| Failure::Timeout("no WebSocket echo".into()))?;
            match reply {
                Some(Ok(WsMessage::Text(t))) if t.as_str() == text => {
                    samples.push(ms(start.elapsed()))
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(Failure::Other(format!("WebSocket: {e}"))),
                None => {
                    return Err(Failure::Other(
                        "WebSocket closed by the far end (a proxy?)".into(),
                    ))
                }
            }
        }
        let _ = ws.close(None).await;
        Ok::<_, Failure>((samples, tls_ms))
    };
    let outcome = run.await;
    result.reached = trail.connected.get();
    result.tls_certificate = trail.seen.into_inner();
    match outcome {
        Ok((samples, tls_ms)) => {
            result.tls_handshake_ms = Some(tls_ms);
            result.with_samples(&samples, opts.samples)
        }
        Err(e) => result.failed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls() {
        assert_eq!(
            "http://u:p@proxy.corp:3128".parse::<Proxy>(),
            Ok(Proxy {
                host: "proxy.corp".into(),
                port: 3128,
                auth: Some("u:p".into())
            })
        );
        assert_eq!(
            "http://127.0.0.1:8080/".parse::<Proxy>().map(|p| p.port),
            Ok(8080)
        );
        assert!("socks5://x:1".parse::<Proxy>().is_err());
    }

    #[test]
    fn echo_replies_name_the_mapping() {
        let mut reply = echo_request(7);
        reply[..4].copy_from_slice(b"TPER");
        reply[16..31].copy_from_slice(b"203.0.113.9:443");
        assert_eq!(echo_mapped(&reply).as_deref(), Some("203.0.113.9:443"));
        assert_eq!(echo_mapped(&echo_request(1)), None);
    }
}

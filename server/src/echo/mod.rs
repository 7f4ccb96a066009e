//! Echo services, off unless configured: UDP and TCP echo on configured ports and ranges, a
//! WebSocket echo and an HTTP long-poll echo on the relay's HTTP endpoints. They let a client
//! (and the IT staff behind it) learn which ports and protocols pass, its NAT mapping, whether
//! UDP replies get back in, and whether a proxy cuts WebSockets or long-polls.
//!
//! [`wire`] (how a request becomes its reply) and [`limiter`] (the per-source rate limit) are
//! sans IO; this module is the thin tokio layer. The echo sockets run on the main runtime: they
//! are not the relay's hot path. No reply is ever larger than its request, and every source is
//! rate-limited, so an echo cannot be used as an amplifier or a reflector.

pub mod wire;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::connect_info::ConnectInfo;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::admission::Ticket;
use crate::config::EchoSettings;
use crate::metrics::{EchoTransport, Metrics};
use crate::Error;
use turnpike_proto::limiter::{self, Limiter, Rates};
use wire::StreamEcho;

/// A TCP echo connection is closed after this long without a byte from the client...
pub const TCP_IDLE: Duration = Duration::from_secs(30);
/// ...after this long in all...
pub const TCP_LIFETIME: Duration = Duration::from_secs(120);
/// ...and once this many bytes were echoed.
pub const TCP_MAX_BYTES: usize = 4 << 20;
/// Held bytes of a possible tagged block are given back unchanged after this much quiet.
pub const TCP_HOLD: Duration = Duration::from_millis(50);
/// TCP echo connections and WebSockets at once, in all.
const MAX_CONNECTIONS: usize = 1024;
/// Largest WebSocket message (and frame); a larger one closes the socket.
pub const WS_MAX_MESSAGE: usize = 64 << 10;
/// A WebSocket echo is closed after this long without a message (pings count)...
pub const WS_IDLE: Duration = Duration::from_secs(60);
/// ...after this long in all...
pub const WS_LIFETIME: Duration = Duration::from_secs(600);
/// ...and once this many bytes were echoed.
pub const WS_MAX_BYTES: usize = 4 << 20;
/// Where the long-poll echo is served.
pub const LONG_POLL_PATH: &str = "/echo/poll";
/// Long-polls held at once, in all; beyond, 503.
const MAX_LONG_POLLS: usize = 4096;
const UDP_BUFFER: usize = 1 << 20;

/// What the echo services share: the limits, the rate limiter and the metrics.
pub struct Echo {
    limiter: Mutex<Limiter>,
    metrics: Arc<Metrics>,
    websocket: bool,
    long_poll_max: Duration,
    conns_per_ip_max: u32,
    /// Open TCP echo connections and WebSockets: in all, and per source.
    /// Per source: an IPv4 address or an IPv6 /64 ([`limiter::source_key`]).
    conns: Mutex<(usize, HashMap<u128, u32>)>,
    long_polls: AtomicUsize,
}

impl Echo {
    /// `conns_per_ip_max`: TCP echo connections and WebSockets one source may hold at once.
    pub fn new(settings: &EchoSettings, conns_per_ip_max: u32, metrics: Arc<Metrics>) -> Self {
        Echo {
            limiter: Mutex::new(Limiter::new(
                Rates {
                    packets_per_sec: f64::from(settings.packets_per_sec),
                    bytes_per_sec: settings.bytes_per_sec as f64,
                },
                limiter::MAX_SOURCES,
            )),
            metrics,
            websocket: settings.websocket,
            long_poll_max: Duration::from_secs(settings.long_poll_max_secs),
            conns_per_ip_max,
            conns: Mutex::new((0, HashMap::new())),
            long_polls: AtomicUsize::new(0),
        }
    }

    fn limiter(&self) -> std::sync::MutexGuard<'_, Limiter> {
        self.limiter.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// May `ip` have one more message of `len` bytes echoed now?
    fn allow(&self, ip: IpAddr, len: usize) -> bool {
        self.limiter().allow(ip, len, Instant::now())
    }

    /// Counts one more TCP echo connection or WebSocket of `ip`, unless it is one too many.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<ConnGuard> {
        let mut g = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per_ip) = &mut *g;
        let key = limiter::source_key(ip);
        let n = per_ip.get(&key).copied().unwrap_or(0);
        if *total >= MAX_CONNECTIONS || n >= self.conns_per_ip_max {
            return None;
        }
        *total += 1;
        per_ip.insert(key, n + 1);
        Some(ConnGuard {
            echo: Arc::clone(self),
            key,
        })
    }
}

/// Counts a TCP echo connection or WebSocket for as long as it lives.
struct ConnGuard {
    echo: Arc<Echo>,
    key: u128,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut g = self.echo.conns.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per_ip) = &mut *g;
        *total = total.saturating_sub(1);
        if let Some(n) = per_ip.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.key);
            }
        }
    }
}

/// The echo sockets, bound at start (before the log names them).
pub struct BoundEcho {
    udp: Vec<std::net::UdpSocket>,
    tcp: Vec<std::net::TcpListener>,
}

fn socket(addr: SocketAddr, ty: Type, protocol: Protocol) -> std::io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), ty, Some(protocol))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    Ok(sock)
}

/// Binds every configured echo port. No SO_REUSEPORT: a port the relay (or anything else)
/// already uses is an error at start, not silently shared.
pub fn bind(settings: &EchoSettings) -> Result<BoundEcho, Error> {
    let mut out = BoundEcho {
        udp: Vec::new(),
        tcp: Vec::new(),
    };
    for &addr in &settings.udp {
        let bound = (|| {
            let sock = socket(addr, Type::DGRAM, Protocol::UDP)?;
            let _ = sock.set_recv_buffer_size(UDP_BUFFER);
            let _ = sock.set_send_buffer_size(UDP_BUFFER);
            sock.bind(&addr.into())?;
            Ok(sock.into())
        })()
        .map_err(|source| Error::Bind {
            what: "echo-udp",
            addr,
            source,
        })?;
        out.udp.push(bound);
    }
    for &addr in &settings.tcp {
        let bound = (|| {
            let sock = socket(addr, Type::STREAM, Protocol::TCP)?;
            sock.set_reuse_address(true)?;
            sock.bind(&addr.into())?;
            sock.listen(128)?;
            Ok(sock.into())
        })()
        .map_err(|source| Error::Bind {
            what: "echo-tcp",
            addr,
            source,
        })?;
        out.tcp.push(bound);
    }
    Ok(out)
}

impl BoundEcho {
    pub fn udp_addrs(&self) -> Vec<SocketAddr> {
        self.udp
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }

    pub fn tcp_addrs(&self) -> Vec<SocketAddr> {
        self.tcp
            .iter()
            .filter_map(|s| s.local_addr().ok())
            .collect()
    }

    /// Starts serving on the current tokio runtime.
    pub fn spawn(self, echo: &Arc<Echo>) -> Result<(), Error> {
        for s in self.udp {
            let s = UdpSocket::from_std(s)?;
            tokio::spawn(udp_loop(s, Arc::clone(echo)));
        }
        for l in self.tcp {
            let l = TcpListener::from_std(l)?;
            tokio::spawn(tcp_accept_loop(l, Arc::clone(echo)));
        }
        Ok(())
    }
}

async fn udp_loop(sock: UdpSocket, echo: Arc<Echo>) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "echo-udp receive failed");
                continue;
            }
        };
        let datagram = &mut buf[..n];
        if wire::refused(datagram, from) || !echo.allow(from.ip(), n) {
            echo.metrics.echo_dropped(EchoTransport::Udp);
            continue;
        }
        wire::rewrite(datagram, from);
        match sock.send_to(datagram, from).await {
            Ok(_) => echo.metrics.echo_sent(EchoTransport::Udp),
            Err(e) => tracing::debug!(%from, error = %e, "echo-udp send failed"),
        }
    }
}

async fn tcp_accept_loop(listener: TcpListener, echo: Arc<Echo>) {
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "echo-tcp accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(guard) = echo.admit(from.ip()) else {
            echo.metrics.echo_dropped(EchoTransport::Tcp);
            continue;
        };
        tokio::spawn(async move {
            let echo = Arc::clone(&guard.echo);
            let ended = tokio::time::timeout(TCP_LIFETIME, tcp_echo(tcp, from, &echo)).await;
            if let Ok(Err(e)) = ended {
                tracing::debug!(%from, error = %e, "echo-tcp connection ended");
            }
            drop(guard);
        });
    }
}

/// Echoes one TCP connection (bounded in time by the caller).
async fn tcp_echo(mut tcp: TcpStream, from: SocketAddr, echo: &Echo) -> std::io::Result<()> {
    let _ = tcp.set_nodelay(true);
    let chunk = 4096.min(echo.limiter().rates().max_bytes()).max(1);
    let mut buf = vec![0u8; chunk];
    let mut out = Vec::with_capacity(chunk + wire::BLOCK);
    let mut state = StreamEcho::new();
    let mut echoed = 0usize;
    let mut last_read = Instant::now();
    while echoed < TCP_MAX_BYTES {
        let wait = if state.held() > 0 {
            TCP_HOLD
        } else {
            (last_read + TCP_IDLE).saturating_duration_since(Instant::now())
        };
        let want = chunk.min(TCP_MAX_BYTES - echoed);
        let n = match tokio::time::timeout(wait, tcp.read(&mut buf[..want])).await {
            Ok(r) => r?,
            Err(_) if state.held() > 0 => {
                out.clear();
                state.flush(&mut out);
                tcp.write_all(&out).await?;
                continue;
            }
            Err(_) => break,
        };
        if n == 0 {
            break;
        }
        last_read = Instant::now();
        if !echo.allow(from.ip(), n) {
            // Dropping bytes would corrupt the stream: wait for the tokens instead, which TCP
            // flow control turns into back-pressure on the sender.
            echo.metrics.echo_dropped(EchoTransport::Tcp);
            while !echo.allow(from.ip(), n) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        out.clear();
        state.feed(&buf[..n], from, &mut out);
        tcp.write_all(&out).await?;
        echoed += n;
        echo.metrics.echo_sent(EchoTransport::Tcp);
    }
    out.clear();
    state.flush(&mut out);
    tcp.write_all(&out).await?;
    tcp.shutdown().await
}

/// The HTTP echo routes, `/echo/ws` and `/echo/poll`, as configured (none when both are off).
/// Handlers take the client address from `ConnectInfo` when the server provides it.
pub fn routes(echo: &Arc<Echo>) -> Router {
    let mut r = Router::new();
    if echo.websocket {
        r = r.route("/echo/ws", get(ws_handler));
    }
    if !echo.long_poll_max.is_zero() {
        r = r.route(LONG_POLL_PATH, get(poll_handler));
    }
    r.with_state(Arc::clone(echo))
}

type Client = Option<Extension<ConnectInfo<SocketAddr>>>;

fn client_addr(c: Client) -> Option<SocketAddr> {
    c.map(|Extension(ConnectInfo(a))| a)
}

async fn ws_handler(
    State(echo): State<Arc<Echo>>,
    client: Client,
    ticket: Option<Extension<Ticket>>,
    ws: WebSocketUpgrade,
) -> Response {
    let ip = client_addr(client).map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
    // Counted here, since an upgraded connection leaves the HTTP server's own accounting.
    let Some(guard) = echo.admit(ip) else {
        echo.metrics.echo_dropped(EchoTransport::WebSocket);
        return (StatusCode::SERVICE_UNAVAILABLE, "too many WebSockets\n").into_response();
    };
    ws.max_message_size(WS_MAX_MESSAGE)
        .max_frame_size(WS_MAX_MESSAGE)
        .on_upgrade(move |socket| async move {
            // The upgraded connection stays counted by the listener's admission too.
            let _ticket = ticket;
            let _ = tokio::time::timeout(WS_LIFETIME, ws_echo(socket, ip, &echo)).await;
            drop(guard);
        })
}

async fn ws_echo(mut socket: WebSocket, ip: IpAddr, echo: &Echo) {
    let mut echoed = 0usize;
    while echoed < WS_MAX_BYTES {
        let msg = match tokio::time::timeout(WS_IDLE, socket.recv()).await {
            Ok(Some(Ok(m))) => m,
            // Idle, closed, or an error such as a message over WS_MAX_MESSAGE.
            _ => break,
        };
        let len = match &msg {
            Message::Text(t) => t.len(),
            Message::Binary(b) => b.len(),
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        if !echo.allow(ip, len) {
            echo.metrics.echo_dropped(EchoTransport::WebSocket);
            continue;
        }
        if socket.send(msg).await.is_err() {
            break;
        }
        echoed += len;
        echo.metrics.echo_sent(EchoTransport::WebSocket);
    }
}

/// Holds a long-poll slot while a request is held.
struct PollSlot<'a>(&'a AtomicUsize);

impl Drop for PollSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The hold asked for in `hold=SECS` (seconds, fractions allowed), at most `max`; without it,
/// `max`.
pub fn parse_hold(query: Option<&str>, max: Duration) -> Result<Duration, String> {
    let Some(v) = query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("hold="))
    else {
        return Ok(max);
    };
    match v.parse::<f64>() {
        Ok(s) if s.is_finite() && s >= 0.0 => Ok(Duration::from_secs_f64(s.min(max.as_secs_f64()))),
        _ => Err(format!("hold={v}: expected a number of seconds\n")),
    }
}

async fn poll_handler(State(echo): State<Arc<Echo>>, client: Client, uri: Uri) -> Response {
    let client = client_addr(client);
    let hold = match parse_hold(uri.query(), echo.long_poll_max) {
        Ok(h) => h,
        Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    let ip = client.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
    if !echo.allow(ip, 0) {
        echo.metrics.echo_dropped(EchoTransport::LongPoll);
        return (StatusCode::TOO_MANY_REQUESTS, "rate limited\n").into_response();
    }
    if echo.long_polls.fetch_add(1, Ordering::Relaxed) >= MAX_LONG_POLLS {
        echo.long_polls.fetch_sub(1, Ordering::Relaxed);
        echo.metrics.echo_dropped(EchoTransport::LongPoll);
        return (StatusCode::SERVICE_UNAVAILABLE, "too many long-polls\n").into_response();
    }
    let _slot = PollSlot(&echo.long_polls);
    let start = Instant::now();
    tokio::time::sleep(hold).await;
    let held_ms = start.elapsed().as_millis();
    echo.metrics.echo_sent(EchoTransport::LongPoll);
    let body = match client {
        Some(a) => format!(
            "{{\"held_ms\": {held_ms}, \"client\": \"{}\"}}\n",
            wire::addr_text(a)
        ),
        None => format!("{{\"held_ms\": {held_ms}}}\n"),
    };
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_is_capped_and_defaults_to_the_maximum() {
        let max = Duration::from_secs(30);
        assert_eq!(parse_hold(Some("hold=1"), max), Ok(Duration::from_secs(1)));
        assert_eq!(
            parse_hold(Some("x=y&hold=0.5"), max),
            Ok(Duration::from_millis(500))
        );
        assert_eq!(parse_hold(Some("hold=999"), max), Ok(max));
        assert_eq!(parse_hold(None, max), Ok(max));
        assert!(parse_hold(Some("hold=-1"), max).is_err());
        assert!(parse_hold(Some("hold=inf"), max).is_err());
        assert!(parse_hold(Some("hold=abc"), max).is_err());
    }
}

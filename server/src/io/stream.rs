//! TCP and TLS listeners: one port for TURN over TCP, TURN over TLS, HTTPS and plain HTTP.
//!
//! A connection is classified from its first bytes, read as they arrive and handed on with it:
//! a PROXY protocol header first where the listener expects one; a TLS record (0x16) on a TLS
//! listener is a ClientHello, whose ALPN and SNI decide between TURN, the built-in HTTPS
//! endpoints and the configured upstream web server (which gets the connection untouched, TLS
//! and all); anything else is STUN/ChannelData framing (RFC 8656 §10.1) or an HTTP request.
//! A connection that holds no allocation is held to a deadline, a lifetime and a few KiB
//! (`read_loop`); each end is counted by its reason.

use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout_at;

use super::conn::{write_loop, Close, Outbox};
use super::state::Shard;
use crate::admission::{AcceptBackoff, Admitted, Ticket};
use crate::config::{Listener, Transport};
use crate::http::{serve_http_stream, HttpEnd, HttpLimits};
use turnpike_proto::{ClientAction, ClientId, TcpQuota};

pub use super::conn::StreamContext;
pub use turnpike_proto::STREAM_BASE;
/// Longest STUN message or ChannelData frame on a stream.
const MAX_FRAME: usize = 4 + 65_535 + 3;

/// ALPN ids: RFC 7443 for TURN and STUN, then HTTP/1.1 for the built-in endpoints.
pub const ALPN_TURN: &[u8] = b"stun.turn";
pub const ALPN_STUN: &[u8] = b"stun.nat-discovery";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
pub const ALPN_H2: &[u8] = b"h2";

/// Accepts connections on one of this shard's stream listeners. A failed accept (EMFILE:
/// out of descriptors) backs off, doubling, rather than spinning on the queued connection.
/// Each connection's end is counted by its reason.
pub(super) async fn accept_loop(shard: Rc<Shard>, listener: TcpListener, cfg: Listener) {
    let mut backoff = AcceptBackoff::default();
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                backoff.failed(&e, cfg.transport.scheme()).await;
                continue;
            }
        };
        backoff.reset();
        let _ = tcp.set_nodelay(true);
        let shard = Rc::clone(&shard);
        tokio::task::spawn_local(async move {
            if let Some(why) = connection(&shard, tcp, from, cfg).await {
                tracing::debug!(%from, reason = why.label(), "connection closed");
                shard.metrics.connection_closed(why);
            }
        });
    }
}

/// Why an IO error ended a connection.
fn close_of(e: &std::io::Error) -> Close {
    match e.kind() {
        std::io::ErrorKind::InvalidData => Close::Malformed,
        _ => Close::Client,
    }
}

/// Serves one stream connection from its accept to its end; why it ended (None when the
/// admission refused it, which counts that itself).
///
/// Nothing is peeked: what arrives before the connection says what it is (a PROXY header, a
/// ClientHello, the first TURN frame or HTTP request line) is read into `head`, waiting on
/// readiness, and handed on with the connection ([`Prefixed`]); so a stalled handshake
/// costs its socket and the bytes it sent, no CPU.
async fn connection(
    shard: &Rc<Shard>,
    mut tcp: TcpStream,
    from: SocketAddr,
    cfg: Listener,
) -> Option<Close> {
    let ctx = Arc::clone(&shard.streams);
    // Counted from its accept, so connections stuck before their PROXY header count too.
    let arriving = match ctx.admission.arrive() {
        Ok(a) => a,
        Err(why) => {
            shard.metrics.connection_refused(why);
            return None;
        }
    };
    // One deadline for everything before the connection says what it is, and a lifetime for
    // as long as it holds no allocation.
    let born = tokio::time::Instant::now();
    let deadline = born + ctx.handshake_timeout;
    let lifetime = born + ctx.unallocated_lifetime;
    let mut head = Vec::new();
    let client_addr = if cfg.proxy_protocol {
        match timeout_at(deadline, read_proxy_header(&mut tcp, &mut head)).await {
            Ok(Ok(Some(a))) => a,
            Ok(Ok(None)) => from,
            Ok(Err(e)) => return Some(close_of(&e)),
            Err(_) => return Some(Close::Handshake),
        }
    } else {
        from
    };
    let mut admitted = match arriving.from(client_addr.ip()) {
        Ok(a) => a,
        Err(why) => {
            shard.metrics.connection_refused(why);
            tracing::debug!(client = %client_addr, reason = why.label(), "connection refused");
            return None;
        }
    };
    if head.is_empty() {
        match timeout_at(deadline, read_more(&mut tcp, &mut head, HELLO_MAX)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Some(close_of(&e)),
            Err(_) => return Some(Close::Handshake),
        }
    }
    let start = |head, tls, host| Start {
        client_addr,
        tls,
        host,
        head,
        deadline,
        lifetime,
        client_tls: None,
    };
    // A TURN stream opens with a STUN request (first byte 0x00 or 0x01): ChannelData cannot
    // come first, since channels belong to an allocation made on this connection. So any
    // other first byte is HTTP, whose methods would collide with ChannelData's 0x40-0x7F.
    if head[0] != 0x16 || cfg.transport != Transport::Tls {
        return Some(match head[0] {
            0x00 | 0x01 => turn_stream(shard, tcp, start(head, false, None), admitted).await,
            _ => {
                serve_http(
                    &ctx,
                    Prefixed::new(head, tcp),
                    start(Vec::new(), false, None),
                    admitted,
                )
                .await
            }
        });
    }
    let hello = match timeout_at(deadline, client_hello(&mut tcp, &mut head)).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => return Some(close_of(&e)),
        Err(_) => return Some(Close::Handshake),
    };
    let wants_turn = hello.alpn.iter().any(|p| p == ALPN_TURN || p == ALPN_STUN);
    let wants_http = hello.alpn.iter().any(|p| p == ALPN_HTTP1 || p == ALPN_H2);
    if let Some(upstream) = ctx.upstream {
        let web_name = match &hello.sni {
            Some(name) => ctx
                .web_hostnames
                .iter()
                .any(|w| w.eq_ignore_ascii_case(name)),
            None => false,
        };
        if !wants_turn && (web_name || (ctx.web_hostnames.is_empty() && wants_http)) {
            // The website's connections count per source, not among the relay's own
            // connections without an allocation: a busy site must not lock TURN out.
            admitted.allocated();
            return Some(match pass_through(tcp, head, upstream).await {
                Ok(()) => Close::Client,
                Err(e) => close_of(&e),
            });
        }
    }
    let Some(config) = ctx.tls.load_full() else {
        return Some(Close::Client);
    };
    let handshake = async {
        let accepting = tokio_rustls::LazyConfigAcceptor::new(
            rustls::server::Acceptor::default(),
            Prefixed::new(head, tcp),
        );
        accepting.await?.into_stream(config).await
    };
    let mut tls = match timeout_at(deadline, handshake).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            // A client that refused the handshake (a certificate it does not trust): the
            // browser test tells the relay's certificate from the network by it.
            if let Some(alert) = crate::tls_seen::client_alert(&e) {
                ctx.tls_refusals
                    .record(client_addr.ip(), alert, std::time::Instant::now());
            }
            return Some(close_of(&e));
        }
        Err(_) => return Some(Close::Handshake),
    };
    let client_tls = crate::tls_seen::ClientTls {
        grease: hello.grease,
    };
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    // The SNI host name selects the client's tenant.
    let host = tls.get_ref().1.server_name().map(str::to_owned);
    Some(match alpn.as_deref() {
        Some(ALPN_TURN) | Some(ALPN_STUN) => {
            turn_stream(shard, tls, start(Vec::new(), true, host), admitted).await
        }
        Some(_) => {
            let start = Start {
                client_tls: Some(client_tls),
                ..start(Vec::new(), true, host)
            };
            serve_http(&ctx, tls, start, admitted).await
        }
        None => {
            // No ALPN (most TURN clients, Chromium among them): the first decrypted byte says.
            let mut first = Vec::with_capacity(UNALLOCATED_FRAME);
            match timeout_at(deadline, tls.read_buf(&mut first)).await {
                Ok(Ok(0)) => return Some(Close::Client),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Some(close_of(&e)),
                Err(_) => return Some(Close::Handshake),
            }
            match first[0] {
                0x00 | 0x01 => turn_stream(shard, tls, start(first, true, host), admitted).await,
                _ => {
                    let start = Start {
                        client_tls: Some(client_tls),
                        ..start(Vec::new(), true, host)
                    };
                    serve_http(&ctx, Prefixed::new(first, tls), start, admitted).await
                }
            }
        }
    })
}

/// What a connection starts with: the client (as a PROXY header named it), whether it came
/// over TLS and its SNI name (which selects the tenant), bytes already read, the deadline of
/// its first frame, and when it closes if it never holds an allocation.
struct Start {
    client_addr: SocketAddr,
    tls: bool,
    host: Option<String>,
    head: Vec<u8>,
    deadline: tokio::time::Instant,
    lifetime: tokio::time::Instant,
    /// What its TLS ClientHello showed (TLS connections).
    client_tls: Option<crate::tls_seen::ClientTls>,
}

/// The most a PROXY protocol header may take (v1 is at most 107 bytes).
const PROXY_MAX: usize = 536;
/// The most a ClientHello may take.
const HELLO_MAX: usize = 16 * 1024;
/// Longest frame a connection without an allocation may send: its requests are small (an
/// Allocate with its attributes), and ChannelData needs an allocation.
const UNALLOCATED_FRAME: usize = 4096;
/// What a connection reads at once with an allocation.
const READ_CHUNK: usize = 16 * 1024;

/// Reads what has arrived into `head`, waiting until something has; an error at the end of
/// the stream, or when `head` would pass `max`.
async fn read_more(tcp: &mut TcpStream, head: &mut Vec<u8>, max: usize) -> std::io::Result<()> {
    if head.len() >= max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "too long before saying what it is",
        ));
    }
    head.reserve_exact((max - head.len()).min(1024));
    if tcp.read_buf(head).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Reads a PROXY protocol v1 or v2 header into `head` and removes it, leaving what followed;
/// returns the client address it names (None for `LOCAL`/`UNKNOWN`, health checks of the load
/// balancer itself).
async fn read_proxy_header(
    tcp: &mut TcpStream,
    head: &mut Vec<u8>,
) -> std::io::Result<Option<SocketAddr>> {
    loop {
        if !head.is_empty() {
            let (len, addr) = match ppp::HeaderResult::parse(head) {
                ppp::HeaderResult::V1(Ok(h)) => (
                    h.header.len(),
                    match h.addresses {
                        ppp::v1::Addresses::Tcp4(a) => {
                            Some(SocketAddr::new(a.source_address.into(), a.source_port))
                        }
                        ppp::v1::Addresses::Tcp6(a) => {
                            Some(SocketAddr::new(a.source_address.into(), a.source_port))
                        }
                        ppp::v1::Addresses::Unknown => None,
                    },
                ),
                ppp::HeaderResult::V2(Ok(h)) => (
                    h.len(),
                    match h.addresses {
                        ppp::v2::Addresses::IPv4(a) => {
                            Some(SocketAddr::new(a.source_address.into(), a.source_port))
                        }
                        ppp::v2::Addresses::IPv6(a) => {
                            Some(SocketAddr::new(a.source_address.into(), a.source_port))
                        }
                        _ => None,
                    },
                ),
                r if ppp::PartialResult::is_incomplete(&r) => {
                    read_more(tcp, head, PROXY_MAX).await?;
                    continue;
                }
                _ => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "bad PROXY header",
                    ))
                }
            };
            head.drain(..len);
            return Ok(addr);
        }
        read_more(tcp, head, PROXY_MAX).await?;
    }
}

struct Hello {
    sni: Option<String>,
    alpn: Vec<Vec<u8>>,
    /// It offered GREASE (RFC 8701), as Chromium always does.
    grease: bool,
}

/// Reads until a whole ClientHello is in `head` and reads its SNI and ALPN; `head` keeps the
/// bytes for the handshake (or the upstream website) to read again.
async fn client_hello(tcp: &mut TcpStream, head: &mut Vec<u8>) -> std::io::Result<Hello> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut fed = 0;
    loop {
        while fed < head.len() {
            let mut rest = &head[fed..];
            match acceptor.read_tls(&mut rest) {
                Ok(n) => fed += n,
                Err(e) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("bad ClientHello: {e}"),
                    ))
                }
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => {
                let hello = accepted.client_hello();
                return Ok(Hello {
                    sni: hello.server_name().map(str::to_owned),
                    alpn: hello
                        .alpn()
                        .map(|a| a.map(<[u8]>::to_vec).collect())
                        .unwrap_or_default(),
                    grease: crate::tls_seen::has_grease(hello.cipher_suites()),
                });
            }
            Ok(None) => read_more(tcp, head, HELLO_MAX).await?,
            Err((e, _)) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("bad ClientHello: {e}"),
                ))
            }
        }
    }
}

/// Hands the connection to the website: what was read first, then both ways untouched.
async fn pass_through(
    mut tcp: TcpStream,
    head: Vec<u8>,
    upstream: SocketAddr,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut up = TcpStream::connect(upstream).await?;
    let _ = up.set_nodelay(true);
    up.write_all(&head).await?;
    drop(head);
    tokio::io::copy_bidirectional(&mut tcp, &mut up).await?;
    Ok(())
}

/// Serves the built-in endpoints; handlers see the client address (the one a PROXY header
/// named, where there was one) as axum's `ConnectInfo`, and whether the connection is TLS as
/// a [`Secure`](crate::http::Secure) extension. Upgrades (the WebSocket echo) work. The
/// connection closes at its lifetime: it never holds an allocation.
async fn serve_http<S>(ctx: &StreamContext, stream: S, start: Start, admitted: Admitted) -> Close
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = HttpLimits {
        headers: ctx.handshake_timeout,
        long: ctx.long_poll,
        lifetime: start
            .lifetime
            .saturating_duration_since(tokio::time::Instant::now()),
    };
    let ticket = Ticket(Arc::new(admitted));
    match serve_http_stream(
        ctx.http.clone(),
        stream,
        start.client_addr,
        start.tls,
        start.client_tls,
        limits,
        ticket,
    )
    .await
    {
        Ok(HttpEnd::Done) => Close::Client,
        Ok(HttpEnd::Lifetime) => Close::Lifetime,
        Err(e) => close_of(&e),
    }
}

/// Runs TURN over a stream: STUN messages and ChannelData framed back to back; why it ended.
async fn turn_stream<S>(shard: &Rc<Shard>, stream: S, mut start: Start, admitted: Admitted) -> Close
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let id = shard.next_conn.get();
    shard
        .next_conn
        .set(if id == u32::MAX { STREAM_BASE } else { id + 1 });
    let client = ClientId {
        listener: id,
        addr: start.client_addr,
    };
    if let Some(h) = &start.host {
        shard.core.borrow_mut().set_client_host(client, h);
    }
    if start.tls {
        shard.core.borrow_mut().set_client_tls(client);
    }
    let outbox = Rc::new(Outbox::new());
    shard.conns.borrow_mut().insert(id, Rc::clone(&outbox));
    let (mut rd, wr) = tokio::io::split(stream);
    let writer = tokio::task::spawn_local(write_loop(
        Rc::clone(&outbox),
        wr,
        shard.streams.idle_timeout,
    ));
    let mut admitted = admitted;
    let head = std::mem::take(&mut start.head);
    let result = read_loop(shard, &mut rd, client, &outbox, head, &start, &mut admitted).await;
    outbox.closed.set(true);
    shard.conns.borrow_mut().remove(&id);
    shard.core.borrow_mut().close_client(client);
    shard.process_events();
    match result {
        // RFC 6062: this data connection is bound; once the success response is written it
        // carries the peer's bytes unframed, as part of its allocation.
        Ok(Some((connection, quota, early))) => {
            admitted.allocated();
            outbox.notify.notify_one();
            let Ok(Some(wr)) = writer.await else {
                shard.end_connection(connection);
                return Close::Client;
            };
            match shard.pipe(connection, rd.unsplit(wr), &early, quota).await {
                Ok(()) => Close::Client,
                Err(e) => close_of(&e),
            }
        }
        Ok(None) => {
            writer.abort();
            Close::Client
        }
        Err(why) => {
            writer.abort();
            why
        }
    }
}

/// Reads frames (after those in `buf`, read already) until the connection closes (`None`), or
/// until a ConnectionBind made it an RFC 6062 data connection (the connection id, its quota, and any bytes read after the
/// request); or says why it must end.
///
/// Without an allocation a connection is held to little: its first frame is due by the
/// handshake deadline, later ones within the idle timeout, frames of at most
/// [`UNALLOCATED_FRAME`], and it ends at its lifetime whatever it sends, unless it has held an
/// allocation before; its outbox is small, and a client that does not read what it asked
/// for is cut (`Outbox::push`). With an allocation it lives as long as that.
async fn read_loop<R: AsyncRead + Unpin>(
    shard: &Rc<Shard>,
    rd: &mut R,
    client: ClientId,
    outbox: &Outbox,
    mut buf: Vec<u8>,
    start: &Start,
    admitted: &mut Admitted,
) -> Result<Option<(u32, TcpQuota, Vec<u8>)>, Close> {
    let idle = shard.streams.idle_timeout;
    let mut framed = false;
    let mut ever_allocated = false;
    loop {
        let mut pos = 0;
        while let Some(len) = frame_len(&buf[pos..]) {
            let allocated = shard.core.borrow().has_allocation(client);
            if len
                > if allocated {
                    MAX_FRAME
                } else {
                    UNALLOCATED_FRAME
                }
            {
                return Err(Close::Malformed);
            }
            if buf.len() - pos < len {
                break;
            }
            framed = true;
            let bound = handle_frame(shard, &buf[pos..pos + len], client, outbox);
            pos += len;
            if let Some((connection, quota)) = bound {
                return Ok(Some((connection, quota, buf.split_off(pos))));
            }
        }
        if pos < buf.len() && frame_len(&buf[pos..]).is_none() && buf.len() - pos >= 4 {
            return Err(Close::Malformed);
        }
        buf.drain(..pos);
        let allocated = shard.core.borrow().has_allocation(client);
        ever_allocated |= allocated;
        outbox.set_allocated(allocated);
        if outbox.held() == 0 && buf.is_empty() && buf.capacity() > READ_CHUNK {
            buf.shrink_to(0);
        }
        // With an allocation: no deadline (its lifetime is the allocation's, which the client
        // refreshes). Without: the first frame's deadline or the idle timeout, and the
        // lifetime unless it held one before.
        let (until, why) = if allocated {
            admitted.allocated();
            (None, Close::Client)
        } else {
            if !admitted.unallocated() {
                return Err(Close::Unallocated);
            }
            let (t, why) = if framed {
                (tokio::time::Instant::now() + idle, Close::Idle)
            } else {
                (start.deadline, Close::Handshake)
            };
            match ever_allocated || t <= start.lifetime {
                true => (Some(t), why),
                false => (Some(start.lifetime), Close::Lifetime),
            }
        };
        buf.reserve(if allocated {
            READ_CHUNK
        } else {
            UNALLOCATED_FRAME
        });
        let read = async {
            match until {
                Some(t) => timeout_at(t, rd.read_buf(&mut buf)).await.ok(),
                None => Some(rd.read_buf(&mut buf).await),
            }
        };
        let n = tokio::select! {
            biased;
            why = outbox.broken() => return Err(why),
            r = read => match r {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Err(close_of(&e)),
                None => return Err(why),
            },
        };
        if n == 0 {
            return Ok(None);
        }
    }
}

/// Length of the frame at the start of `buf` (ChannelData padded to four bytes on streams),
/// None while the header is incomplete or the bytes are neither STUN nor ChannelData.
fn frame_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < 4 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    match buf[0] & 0xC0 {
        0x00 => Some(20 + len),
        0x40 => Some(4 + ((len + 3) & !3)),
        _ => None,
    }
}

/// Handles one frame; returns the connection id and its quota when it bound this connection
/// (RFC 6062).
fn handle_frame(
    shard: &Rc<Shard>,
    frame: &[u8],
    client: ClientId,
    outbox: &Outbox,
) -> Option<(u32, TcpQuota)> {
    let action = shard.core.borrow_mut().handle_client(
        frame,
        client,
        Instant::now(),
        super::unix_now(),
        &mut shard.out.borrow_mut(),
    );
    let mut bound = None;
    match action {
        ClientAction::None => {}
        ClientAction::Reply => {
            outbox.push(&shard.out.borrow());
        }
        ClientAction::Relay {
            alloc,
            peer,
            start,
            end,
        } => shard.send_to_peer(alloc, peer, &frame[start..end]),
        ClientAction::Allocate(bind) => {
            shard.allocate(bind);
            let out = shard.out.borrow();
            if !out.is_empty() {
                outbox.push(&out);
            }
        }
        ClientAction::Connect {
            alloc,
            peer,
            connection,
        } => shard.start_connect(alloc, peer, connection),
        ClientAction::DataConnection { connection, quota } => {
            outbox.push(&shard.out.borrow());
            bound = Some((connection, quota));
        }
    }
    shard.process_events();
    bound
}

/// A stream whose first bytes were already read: they are served again before the rest,
/// and let go of once served.
struct Prefixed<S> {
    head: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    fn new(head: Vec<u8>, inner: S) -> Self {
        Prefixed {
            head,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.pos < self.head.len() {
            let n = buf.remaining().min(self.head.len() - self.pos);
            let start = self.pos;
            buf.put_slice(&self.head[start..start + n]);
            self.pos += n;
            if self.pos == self.head.len() {
                self.head = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Loads a PEM certificate chain and key into a TLS configuration: TLS 1.2 and 1.3 only, ALPN
/// for TURN, STUN and HTTP/1.1.
pub fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, crate::Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |path: &std::path::Path, k: &str, reason: String| crate::Error::Config {
        file: path.display().to_string(),
        key: k.to_owned(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| {
            bad(
                cert,
                "tls.cert",
                format!("cannot read a PEM certificate chain: {e}"),
            )
        })?;
    if certs.is_empty() {
        return Err(bad(cert, "tls.cert", "no certificate in the file".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        bad(
            key,
            "tls.key",
            format!("cannot read a PEM private key: {e}"),
        )
    })?;
    let provider = Arc::new(server_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| bad(cert, "tls", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| {
            bad(
                key,
                "tls.key",
                format!("does not match the certificate: {e}"),
            )
        })?;
    config.alpn_protocols = vec![ALPN_TURN.to_vec(), ALPN_STUN.to_vec(), ALPN_HTTP1.to_vec()];
    config.ignore_client_order = true;
    // Stateless session tickets (keys made at start, rotated every few hours): a client that
    // reconnects, to any shard, resumes without a certificate signature, and the relay keeps
    // no session cache for it.
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
        .map_err(|e| bad(cert, "tls", format!("cannot make session ticket keys: {e}")))?;
    Ok(Arc::new(config))
}

/// The relay's TLS provider: aws-lc-rs (a full handshake cost the relay 98 us of CPU against
/// ring's 142 us, measured in one run on the same machine), its SHA-256 suites first and
/// chosen over the client's order. A TLS 1.3 handshake runs its key schedule's dozen HKDF
/// steps in its suite's hash; rustls clients put AES-256-GCM-SHA384 first, and SHA-512 blocks
/// were then 12% of the relay's CPU under a TLS allocation load here, where SHA-256 has the
/// CPU's SHA extensions. Browsers already offer AES-128-GCM-SHA256 first; nothing weaker is
/// offered than before.
fn server_provider() -> rustls::crypto::CryptoProvider {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => 1,
        _ if s.tls13().is_some() => 2,
        _ => 3,
    });
    provider
}

//! TCP and TLS listeners: one port for TURN over TCP, TURN over TLS, HTTPS and plain HTTP.
//!
//! A connection is classified from its first bytes without consuming them (`peek`): a PROXY
//! protocol header is read first where the listener expects one; a TLS record (0x16) on a TLS
//! listener is a ClientHello, whose ALPN and SNI decide between TURN, the built-in HTTPS
//! endpoints and the configured upstream web server (which gets the connection untouched, TLS
//! and all); anything else is STUN/ChannelData framing (RFC 8656 §10.1) or an HTTP request.

use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use super::conn::{write_loop, Outbox};
use super::state::Shard;
use crate::admission::{AcceptBackoff, Admitted, Ticket};
use crate::config::{Listener, Transport};
use crate::http::{serve_http_stream, HttpLimits};
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
            if let Err(e) = connection(shard, tcp, from, cfg).await {
                tracing::debug!(%from, error = %e, "connection ended");
            }
        });
    }
}

async fn connection(
    shard: Rc<Shard>,
    tcp: TcpStream,
    from: SocketAddr,
    cfg: Listener,
) -> std::io::Result<()> {
    let ctx = Arc::clone(&shard.streams);
    // Counted from its accept, so connections stuck before their PROXY header count too.
    let arriving = match ctx.admission.arrive() {
        Ok(a) => a,
        Err(why) => {
            shard.metrics.connection_refused(why);
            return Ok(());
        }
    };
    // One deadline for everything before the connection says what it is.
    let deadline = tokio::time::Instant::now() + ctx.handshake_timeout;
    let client_addr = if cfg.proxy_protocol {
        match tokio::time::timeout_at(deadline, read_proxy_header(&tcp)).await {
            Ok(Ok(Some(a))) => a,
            Ok(Ok(None)) => from,
            _ => return Ok(()),
        }
    } else {
        from
    };
    let mut admitted = match arriving.from(client_addr.ip()) {
        Ok(a) => a,
        Err(why) => {
            shard.metrics.connection_refused(why);
            tracing::debug!(client = %client_addr, reason = why.label(), "connection refused");
            return Ok(());
        }
    };
    let mut first = [0u8; 1];
    let n = tokio::time::timeout_at(deadline, tcp.peek(&mut first))
        .await
        .map_err(timeout)??;
    if n == 0 {
        return Ok(());
    }
    // A TURN stream opens with a STUN request (first byte 0x00 or 0x01): ChannelData cannot
    // come first, since channels belong to an allocation made on this connection. So any
    // other first byte is HTTP, whose methods would collide with ChannelData's 0x40-0x7F.
    if first[0] != 0x16 || cfg.transport != Transport::Tls {
        return match first[0] {
            0x00 | 0x01 => {
                let start = Start {
                    client_addr,
                    tls: false,
                    host: None,
                    head: Vec::new(),
                    deadline,
                    admitted,
                };
                turn_stream(&shard, tcp, start).await
            }
            _ => serve_http(&ctx, tcp, client_addr, false, admitted).await,
        };
    }
    let hello = tokio::time::timeout_at(deadline, client_hello(&tcp))
        .await
        .map_err(timeout)??;
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
            return pass_through(tcp, upstream).await;
        }
    }
    let Some(config) = ctx.tls.load_full() else {
        return Ok(());
    };
    let handshake = async {
        let start =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
        start.into_stream(config).await
    };
    let tls = tokio::time::timeout_at(deadline, handshake)
        .await
        .map_err(timeout)??;
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    // The SNI host name selects the client's tenant.
    let host = tls.get_ref().1.server_name().map(str::to_owned);
    match alpn.as_deref() {
        Some(ALPN_TURN) | Some(ALPN_STUN) => {
            let start = Start {
                client_addr,
                tls: true,
                host,
                head: Vec::new(),
                deadline,
                admitted,
            };
            turn_stream(&shard, tls, start).await
        }
        Some(_) => serve_http(&ctx, tls, client_addr, true, admitted).await,
        None => {
            // No ALPN (most TURN clients, Chromium among them): the first decrypted byte says.
            let mut tls = tls;
            let mut head = vec![0u8; 4096];
            let n = tokio::time::timeout_at(deadline, tls.read(&mut head))
                .await
                .map_err(timeout)??;
            head.truncate(n);
            match head.first() {
                None => Ok(()),
                Some(0x00 | 0x01) => {
                    let start = Start {
                        client_addr,
                        tls: true,
                        host,
                        head,
                        deadline,
                        admitted,
                    };
                    turn_stream(&shard, tls, start).await
                }
                Some(_) => {
                    serve_http(
                        &ctx,
                        Prefixed {
                            head,
                            pos: 0,
                            inner: tls,
                        },
                        client_addr,
                        true,
                        admitted,
                    )
                    .await
                }
            }
        }
    }
}

/// What a TURN stream starts with: the client (as a PROXY header named it), the TLS SNI name
/// (which selects the tenant), bytes already read, the deadline of its first frame, and its
/// place among the admitted connections.
struct Start {
    client_addr: SocketAddr,
    tls: bool,
    host: Option<String>,
    head: Vec<u8>,
    deadline: tokio::time::Instant,
    admitted: Admitted,
}

fn timeout(_: tokio::time::error::Elapsed) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "client too slow")
}

/// Reads a PROXY protocol v1 or v2 header; returns the client address it names (None for
/// `LOCAL`/`UNKNOWN`, health checks of the load balancer itself).
async fn read_proxy_header(tcp: &TcpStream) -> std::io::Result<Option<SocketAddr>> {
    let mut buf = vec![0u8; 536];
    loop {
        let n = tcp.peek(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        match ppp::HeaderResult::parse(&buf[..n]) {
            ppp::HeaderResult::V1(Ok(h)) => {
                let len = h.header.len();
                let addr = match h.addresses {
                    ppp::v1::Addresses::Tcp4(a) => {
                        Some(SocketAddr::new(a.source_address.into(), a.source_port))
                    }
                    ppp::v1::Addresses::Tcp6(a) => {
                        Some(SocketAddr::new(a.source_address.into(), a.source_port))
                    }
                    ppp::v1::Addresses::Unknown => None,
                };
                consume(tcp, len).await?;
                return Ok(addr);
            }
            ppp::HeaderResult::V2(Ok(h)) => {
                let len = h.len();
                let addr = match h.addresses {
                    ppp::v2::Addresses::IPv4(a) => {
                        Some(SocketAddr::new(a.source_address.into(), a.source_port))
                    }
                    ppp::v2::Addresses::IPv6(a) => {
                        Some(SocketAddr::new(a.source_address.into(), a.source_port))
                    }
                    _ => None,
                };
                consume(tcp, len).await?;
                return Ok(addr);
            }
            r if ppp::PartialResult::is_incomplete(&r) && n < buf.len() => {
                tcp.readable().await?;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            _ => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "bad PROXY header",
                ))
            }
        }
    }
}

/// Reads and discards exactly `n` bytes the caller has peeked.
async fn consume(tcp: &TcpStream, mut n: usize) -> std::io::Result<()> {
    let mut sink = [0u8; 536];
    while n > 0 {
        tcp.readable().await?;
        match tcp.try_read(&mut sink[..n.min(536)]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(k) => n -= k,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

struct Hello {
    sni: Option<String>,
    alpn: Vec<Vec<u8>>,
}

/// Peeks until a whole ClientHello has arrived and reads its SNI and ALPN, consuming nothing.
async fn client_hello(tcp: &TcpStream) -> std::io::Result<Hello> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut seen = 0;
    loop {
        let n = tcp.peek(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if n > seen {
            seen = n;
            let mut acceptor = rustls::server::Acceptor::default();
            let mut reader = &buf[..n];
            while !reader.is_empty() {
                if acceptor.read_tls(&mut reader).is_err() {
                    break;
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
                    });
                }
                Ok(None) if n < buf.len() => {}
                Ok(None) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "ClientHello too long",
                    ))
                }
                Err((e, _)) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("bad ClientHello: {e}"),
                    ))
                }
            }
        }
        // More of the ClientHello is on its way; peek again shortly.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn pass_through(mut tcp: TcpStream, upstream: SocketAddr) -> std::io::Result<()> {
    let mut up = TcpStream::connect(upstream).await?;
    let _ = up.set_nodelay(true);
    tokio::io::copy_bidirectional(&mut tcp, &mut up).await?;
    Ok(())
}

/// Serves the built-in endpoints; handlers see the client address (the one a PROXY header
/// named, where there was one) as axum's `ConnectInfo`, and whether the connection is TLS as
/// a [`Secure`] extension. Upgrades (the WebSocket echo) work.
async fn serve_http<S>(
    ctx: &StreamContext,
    stream: S,
    client: SocketAddr,
    tls: bool,
    admitted: Admitted,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = HttpLimits {
        headers: ctx.handshake_timeout,
        long: ctx.long_poll,
    };
    let ticket = Ticket(Arc::new(admitted));
    serve_http_stream(ctx.http.clone(), stream, client, tls, limits, ticket).await
}

/// Runs TURN over a stream: STUN messages and ChannelData framed back to back.
async fn turn_stream<S>(shard: &Rc<Shard>, stream: S, start: Start) -> std::io::Result<()>
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
    let writer = tokio::task::spawn_local(write_loop(Rc::clone(&outbox), wr));
    let mut admitted = start.admitted;
    let result = read_loop(
        shard,
        &mut rd,
        client,
        &outbox,
        start.head,
        start.deadline,
        &mut admitted,
    )
    .await;
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
                return Ok(());
            };
            shard.pipe(connection, rd.unsplit(wr), &early, quota).await
        }
        Ok(None) => {
            writer.abort();
            Ok(())
        }
        Err(e) => {
            writer.abort();
            Err(e)
        }
    }
}

/// Reads frames until the connection closes (`None`), or until a ConnectionBind made it an
/// RFC 6062 data connection (the connection id, its quota, and any bytes read after the
/// request). The first frame is due by `deadline`; later, a connection that holds no
/// allocation is closed after the idle timeout without a byte, or when it cannot count as
/// unallocated again.
async fn read_loop<R: AsyncRead + Unpin>(
    shard: &Rc<Shard>,
    rd: &mut R,
    client: ClientId,
    outbox: &Outbox,
    mut buf: Vec<u8>,
    deadline: tokio::time::Instant,
    admitted: &mut Admitted,
) -> std::io::Result<Option<(u32, TcpQuota, Vec<u8>)>> {
    let idle = shard.streams.idle_timeout;
    let mut chunk = vec![0u8; 16 * 1024];
    let mut framed = false;
    loop {
        let mut pos = 0;
        while let Some(len) = frame_len(&buf[pos..]) {
            if len > MAX_FRAME {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "frame too long",
                ));
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
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "neither STUN nor ChannelData",
            ));
        }
        buf.drain(..pos);
        // A connection that holds an allocation lives as long as it, which the client
        // refreshes; one that holds none must show activity, and its first frame must come
        // within the handshake deadline.
        let n = if shard.core.borrow().has_allocation(client) {
            admitted.allocated();
            rd.read(&mut chunk).await?
        } else {
            if !admitted.unallocated() {
                return Err(std::io::Error::other(
                    "too many connections without an allocation",
                ));
            }
            let until = if framed {
                tokio::time::Instant::now() + idle
            } else {
                deadline
            };
            tokio::time::timeout_at(until, rd.read(&mut chunk))
                .await
                .map_err(timeout)??
        };
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
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

/// A stream whose first bytes were already read: they are served again before the rest.
struct Prefixed<S> {
    head: Vec<u8>,
    pos: usize,
    inner: S,
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

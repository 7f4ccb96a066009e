//! A small TURN client over UDP, TCP or TLS (optionally through an HTTP CONNECT proxy), built
//! on the relay's own codec. It does what a probe needs: Binding, Allocate, CreatePermission,
//! ChannelBind, Send and Data indications, ChannelData, Refresh, with long-term authentication.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UdpSocket;
use turnpike_proto::auth::long_term_key;
use turnpike_proto::stun::{attr, method, Builder, Class, Message, TransactionId, MAGIC_COOKIE};

/// Why a path failed, as the report names it: each kind is a different thing seen, so that
/// a verdict says only what was seen.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Failure {
    #[error("dns: {0}")]
    Dns(String),
    #[error("timeout: {0}")]
    Timeout(String),
    /// A TCP reset to the connection attempt, or ICMP port unreachable: nothing listens there,
    /// or a firewall rejects (the two look the same from here).
    #[error("refused: {0}")]
    Refused(String),
    /// The connection was reset: a middlebox (or the host) cut it.
    #[error("reset: {0}")]
    Reset(String),
    /// No route to the host (ICMP host unreachable, or no answer to ARP on its network).
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// This machine could not send: no route or network of its own, an address it does not
    /// have, its own firewall refusing.
    #[error("local: {0}")]
    Local(String),
    #[error("tls: {0}")]
    Tls(String),
    /// The relay's certificate is not trusted here: why, and what the relay's operator changes.
    #[error("untrusted: {0}")]
    Untrusted(String),
    /// The TLS certificate was not the relay's, with evidence: something on the way inspects
    /// TLS.
    #[error("tls-inspection: {0}")]
    Inspected(String),
    /// The web proxy could not be reached.
    #[error("proxy-unreachable: {0}")]
    ProxyUnreachable(String),
    /// The web proxy refused CONNECT: its status code (0 when it closed or did not answer)
    /// and what it said.
    #[error("proxy: {1}")]
    Proxy(u16, String),
    /// Something answered, but not as a TURN relay (an echo, a web server).
    #[error("not-turn: {0}")]
    NotTurn(String),
    /// A STUN error response: 401, 403, 437, 508…
    #[error("{0} {1}")]
    Status(u16, String),
    #[error("error: {0}")]
    Other(String),
}

impl Failure {
    pub fn io(what: &str, e: std::io::Error) -> Failure {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => Failure::Refused(format!("{what}: connection refused")),
            K::TimedOut => Failure::Timeout(what.to_owned()),
            K::ConnectionReset | K::ConnectionAborted => {
                Failure::Reset(format!("{what}: connection reset"))
            }
            K::HostUnreachable => Failure::Unreachable(format!("{what}: no route to host")),
            K::NetworkUnreachable | K::NetworkDown => Failure::Local(format!(
                "{what}: this machine has no route to that network ({e})"
            )),
            K::AddrNotAvailable => {
                Failure::Local(format!("{what}: this machine has no such address ({e})"))
            }
            K::PermissionDenied => Failure::Local(format!(
                "{what}: refused on this machine, by its own firewall or permissions ({e})"
            )),
            _ => Failure::Other(format!("{what}: {e}")),
        }
    }

    /// Whether something on the way, or the host, answered: a refusal, a reset, a TLS or STUN
    /// answer, anything but silence.
    pub fn answered(&self) -> bool {
        !matches!(
            self,
            Failure::Dns(_)
                | Failure::Timeout(_)
                | Failure::Unreachable(_)
                | Failure::Local(_)
                | Failure::ProxyUnreachable(_)
                | Failure::Other(_)
        )
    }
}

pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

pub enum Conn {
    /// A UDP socket connected to the relay.
    Udp(UdpSocket),
    Stream(Box<dyn Stream>),
}

/// A connection to the relay and the credentials that sign its requests.
pub struct TurnClient {
    conn: Conn,
    creds: Credentials,
    rbuf: Vec<u8>,
    /// Records the UDP datagrams (`measure --capture`); streams record below TLS.
    tap: Option<crate::capture::UdpTap>,
    /// The bandwidth limit the relay gave with the allocation (BANDWIDTH), bytes per second.
    bandwidth_limit: Option<u64>,
}

/// Credentials and the state long-term authentication learns (realm, nonce): what signs a
/// request, with or without the connection it goes out on.
pub struct Credentials {
    username: String,
    password: String,
    realm: Option<String>,
    nonce: Option<Vec<u8>>,
    /// The nonce came from this client's own 401 or 438 (not another client's).
    own_nonce: bool,
    next: u64,
}

impl Credentials {
    fn tid(&mut self) -> TransactionId {
        self.next = self.next.wrapping_add(1);
        let mut t = [0u8; 16];
        t[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        t[4..12].copy_from_slice(&self.next.to_be_bytes());
        t[12..].copy_from_slice(&rand::random::<[u8; 4]>());
        TransactionId(t)
    }

    /// A message of `class` and method `m`; requests other than Binding are signed once a
    /// realm and nonce are known.
    pub fn build(
        &mut self,
        m: u16,
        class: Class,
        extra: &(dyn Fn(&mut Builder<'_>) + Sync),
    ) -> (Vec<u8>, TransactionId) {
        let tid = self.tid();
        let mut buf = Vec::new();
        let mut b = Builder::new(&mut buf, class, m, tid);
        extra(&mut b);
        if let (Some(realm), Some(nonce)) = (&self.realm, &self.nonce) {
            if class == Class::Request && m != method::BINDING {
                let key = long_term_key(&self.username, realm, &self.password);
                b.attr(attr::USERNAME, self.username.as_bytes())
                    .attr(attr::REALM, realm.as_bytes())
                    .attr(attr::NONCE, nonce)
                    .integrity_sha1(&key);
            }
        }
        b.fingerprint();
        (buf, tid)
    }

    /// Takes realm and nonce from a 401 or 438 answer.
    pub fn learn(&mut self, msg: &Message<'_>) {
        self.realm = msg
            .get(attr::REALM)
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .or(self.realm.take());
        self.nonce = msg.get(attr::NONCE).map(<[u8]>::to_vec);
    }
}

const RETRANSMIT: Duration = Duration::from_millis(250);

impl TurnClient {
    pub fn new(conn: Conn, username: &str, password: &str) -> Self {
        TurnClient {
            conn,
            creds: Credentials {
                username: username.to_owned(),
                password: password.to_owned(),
                realm: None,
                nonce: None,
                own_nonce: false,
                next: rand::random(),
            },
            rbuf: Vec::new(),
            tap: None,
            bandwidth_limit: None,
        }
    }

    /// Records this client's UDP datagrams into `path`, when there is one.
    pub fn tapped(mut self, path: Option<&crate::capture::PathCapture>) -> Self {
        if let (Some(path), Conn::Udp(s)) = (path, &self.conn) {
            if let (Ok(local), Ok(remote)) = (s.local_addr(), s.peer_addr()) {
                self.tap = Some(path.udp(local, remote));
            }
        }
        self
    }

    /// Gives the UDP socket back (None for a stream connection).
    pub fn into_udp(self) -> Option<UdpSocket> {
        match self.conn {
            Conn::Udp(s) => Some(s),
            Conn::Stream(_) => None,
        }
    }

    /// Starts with a realm and nonce learnt by another client of the same address, so the
    /// first request is signed at once: one 401 round trip for a whole load rather than one
    /// per allocation (the relay limits how many 401s a source gets a second).
    pub fn with_nonce(mut self, learnt: Option<(String, Vec<u8>)>) -> Self {
        if let Some((realm, nonce)) = learnt {
            self.creds.realm = Some(realm);
            self.creds.nonce = Some(nonce);
        }
        self
    }

    /// The realm and nonce this client signs with, once learnt.
    pub fn nonce(&self) -> Option<(String, Vec<u8>)> {
        Some((self.creds.realm.clone()?, self.creds.nonce.clone()?))
    }

    /// Hands the connection and the learnt credentials over to a data loop, with any bytes
    /// already read from a stream and not yet framed.
    pub fn into_parts(self) -> (Conn, Credentials, Vec<u8>) {
        (self.conn, self.creds, self.rbuf)
    }

    async fn send(&mut self, packet: &[u8]) -> Result<(), Failure> {
        match &mut self.conn {
            Conn::Udp(s) => {
                s.send(packet).await.map_err(|e| Failure::io("send", e))?;
                if let Some(t) = &self.tap {
                    t.sent(packet);
                }
                Ok(())
            }
            Conn::Stream(s) => s
                .write_all(packet)
                .await
                .map_err(|e| Failure::io("write", e)),
        }
    }

    /// The next datagram or stream frame (STUN message or ChannelData), before `deadline`.
    async fn recv(&mut self, deadline: Instant) -> Result<Vec<u8>, Failure> {
        let left = deadline.saturating_duration_since(Instant::now());
        let read = async {
            match &mut self.conn {
                Conn::Udp(s) => {
                    let mut buf = vec![0u8; 2048];
                    let n = s
                        .recv(&mut buf)
                        .await
                        .map_err(|e| Failure::io("receive", e))?;
                    buf.truncate(n);
                    if let (Some(t), Ok(from)) = (&self.tap, s.peer_addr()) {
                        t.received(from, &buf);
                    }
                    Ok(buf)
                }
                Conn::Stream(s) => loop {
                    if let Some(what) = not_turn(&self.rbuf) {
                        return Err(Failure::NotTurn(what));
                    }
                    if self.rbuf.len() >= 4 {
                        let len = usize::from(u16::from_be_bytes([self.rbuf[2], self.rbuf[3]]));
                        let total = if self.rbuf[0] & 0xC0 == 0x40 {
                            4 + ((len + 3) & !3)
                        } else {
                            20 + len
                        };
                        if self.rbuf.len() >= total {
                            let frame: Vec<u8> = self.rbuf.drain(..total).collect();
                            return Ok(frame);
                        }
                    }
                    let mut chunk = [0u8; 4096];
                    let n = s
                        .read(&mut chunk)
                        .await
                        .map_err(|e| Failure::io("read", e))?;
                    if n == 0 {
                        return Err(Failure::Reset(
                            "the far end closed the connection without a TURN answer".into(),
                        ));
                    }
                    self.rbuf.extend_from_slice(&chunk[..n]);
                },
            }
        };
        tokio::time::timeout(left, read)
            .await
            .map_err(|_| Failure::Timeout("no answer from the relay".into()))?
    }

    fn build(
        &mut self,
        m: u16,
        class: Class,
        extra: &(dyn Fn(&mut Builder<'_>) + Sync),
    ) -> (Vec<u8>, TransactionId) {
        self.creds.build(m, class, extra)
    }

    /// One request and its response (retransmitted over UDP), authenticating as needed.
    pub async fn request(
        &mut self,
        m: u16,
        extra: &(dyn Fn(&mut Builder<'_>) + Sync),
        timeout: Duration,
    ) -> Result<Vec<u8>, Failure> {
        let deadline = Instant::now() + timeout;
        for _ in 0..3 {
            let (packet, tid) = self.build(m, Class::Request, extra);
            let response = self.exchange(&packet, tid, deadline).await?;
            let msg = Message::parse(&response).map_err(|e| {
                Failure::NotTurn(format!("an answer that is not a STUN message ({e})"))
            })?;
            match msg.class() {
                Class::Success if msg.method() == m => return Ok(response),
                Class::Error if msg.method() == m && msg.get(attr::ERROR_CODE).is_some() => {}
                Class::Request if response == packet => {
                    return Err(Failure::NotTurn(
                        "the request came back as it was sent: an echo service, not a TURN relay"
                            .into(),
                    ))
                }
                _ => {
                    return Err(Failure::NotTurn(format!(
                        "a STUN {:?} of method {:#06x} in answer to a request of method \
                         {m:#06x}",
                        msg.class(),
                        msg.method()
                    )))
                }
            }
            let (code, reason) = error_code(&msg);
            // 401 with a nonce learnt elsewhere: it may be for another address; learn this one.
            let retry = match code {
                401 if self.creds.nonce.is_none() || !self.creds.own_nonce => true,
                438 => true,
                _ => false,
            };
            self.creds.own_nonce = true;
            if !retry {
                return Err(Failure::Status(code, reason));
            }
            self.creds.learn(&msg);
        }
        Err(Failure::Status(401, "Unauthorized".into()))
    }

    async fn exchange(
        &mut self,
        packet: &[u8],
        tid: TransactionId,
        deadline: Instant,
    ) -> Result<Vec<u8>, Failure> {
        let udp = matches!(self.conn, Conn::Udp(_));
        self.send(packet).await?;
        // RFC 8489 §6.2.1: retransmit over UDP, doubling the interval.
        let mut rto = RETRANSMIT;
        let mut resend = Instant::now() + rto;
        // Datagrams that were no STUN answer at all: what answered is something else.
        let mut strangers = 0;
        loop {
            let until = if udp { resend.min(deadline) } else { deadline };
            match self.recv(until).await {
                Ok(frame) => {
                    if frame.len() >= 20 && frame[0] & 0xC0 == 0 && frame[4..20] == tid.0 {
                        return Ok(frame);
                    }
                    if udp && Message::parse(&frame).is_err() && frame[0] & 0xC0 != 0x40 {
                        strangers += 1;
                    }
                }
                Err(Failure::Timeout(_)) if udp && Instant::now() < deadline => {
                    self.send(packet).await?;
                    rto *= 2;
                    resend = Instant::now() + rto;
                }
                Err(Failure::Timeout(_)) if strangers > 0 => {
                    return Err(Failure::NotTurn(format!(
                        "{strangers} datagrams came back, none of them a STUN answer"
                    )))
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Binding: returns the reflexive address.
    pub async fn binding(&mut self, timeout: Duration) -> Result<SocketAddr, Failure> {
        let r = self.request(method::BINDING, &|_| {}, timeout).await?;
        let msg = Message::parse(&r).map_err(|e| Failure::Other(e.to_string()))?;
        msg.get(attr::XOR_MAPPED_ADDRESS)
            .and_then(|v| msg.xor_address(v))
            .ok_or_else(|| Failure::Other("no XOR-MAPPED-ADDRESS".into()))
    }

    /// Allocate over UDP relaying: the relayed and the mapped address.
    pub async fn allocate(
        &mut self,
        timeout: Duration,
    ) -> Result<(SocketAddr, Option<SocketAddr>), Failure> {
        let r = self
            .request(
                method::ALLOCATE,
                &|b| {
                    b.u32(attr::REQUESTED_TRANSPORT, 17 << 24);
                },
                timeout,
            )
            .await?;
        let msg = Message::parse(&r).map_err(|e| Failure::Other(e.to_string()))?;
        let relayed = msg
            .get(attr::XOR_RELAYED_ADDRESS)
            .and_then(|v| msg.xor_address(v))
            .ok_or_else(|| Failure::Other("no XOR-RELAYED-ADDRESS".into()))?;
        let mapped = msg
            .get(attr::XOR_MAPPED_ADDRESS)
            .and_then(|v| msg.xor_address(v));
        self.bandwidth_limit = msg.get_u32(attr::BANDWIDTH).map(|v| u64::from(v) << 7);
        Ok((relayed, mapped))
    }

    /// The bandwidth limit the relay said the allocation has (its BANDWIDTH attribute, as
    /// Turnpike and coturn send it), bytes per second.
    pub fn bandwidth_limit(&self) -> Option<u64> {
        self.bandwidth_limit
    }

    pub async fn permit(&mut self, peer: SocketAddr, timeout: Duration) -> Result<(), Failure> {
        self.request(
            method::CREATE_PERMISSION,
            &|b| {
                b.xor_address(attr::XOR_PEER_ADDRESS, peer);
            },
            timeout,
        )
        .await
        .map(|_| ())
    }

    /// ChannelBind (RFC 8656 §11): `channel` (0x4000-0x4FFF) to `peer`, which also installs or
    /// refreshes the permission for the peer's address.
    pub async fn channel_bind(
        &mut self,
        channel: u16,
        peer: SocketAddr,
        timeout: Duration,
    ) -> Result<(), Failure> {
        self.request(
            method::CHANNEL_BIND,
            &|b| {
                b.u32(attr::CHANNEL_NUMBER, u32::from(channel) << 16)
                    .xor_address(attr::XOR_PEER_ADDRESS, peer);
            },
            timeout,
        )
        .await
        .map(|_| ())
    }

    pub async fn send_to(&mut self, peer: SocketAddr, data: &[u8]) -> Result<(), Failure> {
        let (packet, _) = self.build(method::SEND, Class::Indication, &|b| {
            b.xor_address(attr::XOR_PEER_ADDRESS, peer)
                .attr(attr::DATA, data);
        });
        self.send(&packet).await
    }

    /// The next Data indication's payload, before `deadline`.
    pub async fn recv_data(&mut self, deadline: Instant) -> Result<Vec<u8>, Failure> {
        self.recv_data_from(deadline).await.map(|(_, d)| d)
    }

    /// The next Data indication's peer and payload, before `deadline`.
    pub async fn recv_data_from(
        &mut self,
        deadline: Instant,
    ) -> Result<(Option<SocketAddr>, Vec<u8>), Failure> {
        loop {
            let frame = self.recv(deadline).await?;
            let Ok(msg) = Message::parse(&frame) else {
                continue;
            };
            if msg.class() == Class::Indication && msg.method() == method::DATA {
                if let Some(d) = msg.get(attr::DATA) {
                    let peer = msg
                        .get(attr::XOR_PEER_ADDRESS)
                        .and_then(|v| msg.xor_address(v));
                    return Ok((peer, d.to_vec()));
                }
            }
        }
    }

    /// Releases the allocation (Refresh with LIFETIME 0), best effort.
    pub async fn release(&mut self) {
        let _ = self
            .request(
                method::REFRESH,
                &|b| {
                    b.u32(attr::LIFETIME, 0);
                },
                Duration::from_secs(1),
            )
            .await;
    }
}

/// Writes a ChannelData message (RFC 8656 §12.4) for `payload` on `channel` into `out`,
/// padded to a multiple of four bytes when `pad` (streams need it; UDP may omit it).
pub fn channel_data(channel: u16, payload: &[u8], pad: bool, out: &mut Vec<u8>) {
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.extend_from_slice(payload);
    if pad {
        out.resize(out.len() + (4 - payload.len() % 4) % 4, 0);
    }
}

/// What a stream's first bytes are when they cannot begin a TURN answer (a STUN message with
/// its magic cookie, or ChannelData): a web server, another protocol. None while they may.
fn not_turn(bytes: &[u8]) -> Option<String> {
    if bytes.starts_with(b"HTTP/") {
        let line = bytes.split(|b| *b == b'\r').next().unwrap_or_default();
        return Some(format!(
            "a web server answered ({})",
            String::from_utf8_lossy(&line[..line.len().min(60)])
        ));
    }
    let first = *bytes.first()?;
    match first & 0xC0 {
        0x00 if bytes.len() >= 8 && bytes[4..8] != MAGIC_COOKIE.to_be_bytes() => Some(format!(
            "an answer without STUN's magic cookie (first bytes {:02x?})",
            &bytes[..8]
        )),
        0x00 | 0x40 => None,
        _ => Some(format!(
            "an answer that is neither STUN nor ChannelData (first byte {first:#04x})"
        )),
    }
}

/// The code and reason of a STUN error response.
pub fn error_code(msg: &Message<'_>) -> (u16, String) {
    match msg.get(attr::ERROR_CODE) {
        Some(v) if v.len() >= 4 => (
            u16::from(v[2] & 7) * 100 + u16::from(v[3]),
            String::from_utf8_lossy(&v[4..]).into_owned(),
        ),
        _ => (0, "error without ERROR-CODE".into()),
    }
}

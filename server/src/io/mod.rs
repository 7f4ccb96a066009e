//! The tokio layer: binds sockets, runs one shard per core and carries out what the core says.
//!
//! Each shard is a thread with its own current-thread runtime, its own `Core`, and one socket
//! per listener bound with SO_REUSEPORT, so the kernel spreads clients over the shards by
//! 4-tuple hash and a shard owns every allocation made through its sockets. Nothing on the
//! packet path takes a lock or allocates: the shard's sockets and core live in `Rc`/`RefCell`,
//! datagrams are read in batches (`recvmmsg`) at an offset of four bytes so a ChannelData
//! header can be written in front without a copy, and what a turn of the event loop sends
//! leaves at its end with one `sendmmsg` per socket, GSO where datagrams share a destination
//! and size (`turnpike_udp` has the measurements). Sends are non-blocking: a full socket buffer
//! drops the datagram, as a router would.
//!
//! From the top down (each imports only those below it):
//!
//! - `shard`: a shard's thread and its loops (listeners, relay sockets, timers, the flush);
//! - [`stream`]: TCP and TLS listeners (TURN, HTTPS, HTTP on one port), a connection from its
//!   first byte to its end;
//! - `relay`: binding the relay sockets the core asks for; `tcp_relay`: RFC 6062 sockets
//!   (allocation listeners, Connect, data connection pipes);
//! - `state`: what all of these share on the shard's thread (the core, sockets, connections,
//!   what a turn sends) and how the core's answers are carried out;
//! - `conn`: what stream connections share and hold (their context, outbox and writer);
//! - `sockets`: TCP socket options.

mod conn;
mod relay;
mod shard;
mod sockets;
mod state;
pub mod stream;
mod tcp_relay;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::time::{SystemTime, UNIX_EPOCH};

use socket2::{Domain, Socket, Type};

use turnpike_udp::socket::bind_udp;

use crate::config::{Listener, Settings, Transport};
use crate::Error;

pub use conn::Close;
pub use shard::{run_shard, ShardSetup};

/// The wall clock in Unix seconds, read at each call (it may step while the relay runs).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Where relay sockets bind and what clients are told.
#[derive(Debug, Clone)]
pub struct RelayPlan {
    pub v4: Option<(IpAddr, IpAddr)>,
    pub v6: Option<(IpAddr, IpAddr)>,
    pub ports: (u16, u16),
}

/// (bound, advertised) for each family, from the settings.
pub fn relay_plan(s: &Settings) -> RelayPlan {
    let mut bind_v4 = s.relay_ips.iter().copied().find(IpAddr::is_ipv4);
    let mut bind_v6 = s.relay_ips.iter().copied().find(IpAddr::is_ipv6);
    if s.relay_ips.is_empty() {
        for l in &s.listen {
            match l.addr.ip() {
                ip if ip.is_unspecified() => {}
                ip @ IpAddr::V4(_) => bind_v4 = bind_v4.or(Some(ip)),
                ip @ IpAddr::V6(_) => bind_v6 = bind_v6.or(Some(ip)),
            }
        }
        if bind_v4.is_none() && bind_v6.is_none() {
            bind_v4 = Some(default_route_ip().unwrap_or_else(|| {
                tracing::warn!("no relay address found; relaying on 127.0.0.1, set relay_ips");
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            }));
        }
    }
    let advertise = |bind: IpAddr| {
        s.external_ips
            .iter()
            .find(|(public, private)| match private {
                Some(p) => *p == bind,
                None => public.is_ipv4() == bind.is_ipv4(),
            })
            .map(|(public, _)| *public)
            .unwrap_or(bind)
    };
    RelayPlan {
        v4: bind_v4.map(|b| (b, advertise(b))),
        v6: bind_v6.map(|b| (b, advertise(b))),
        ports: s.relay_ports,
    }
}

/// The source address the kernel would use for the default route. `connect` on a UDP socket
/// only looks up a route: no datagram is sent.
fn default_route_ip() -> Option<IpAddr> {
    let s = StdUdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

impl RelayPlan {
    /// The relay addresses as the core takes them.
    pub fn addresses(&self) -> [Option<turnpike_proto::RelayAddress>; 2] {
        [self.v4, self.v6]
            .map(|f| f.map(|(bind, advertised)| turnpike_proto::RelayAddress { bind, advertised }))
    }
}

/// Listener sockets, `[listener][shard]`: every shard of a listener bound to the same address.
pub enum Bound {
    Udp(Listener, Vec<StdUdpSocket>),
    Stream(Listener, Vec<std::net::TcpListener>),
}

impl Bound {
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Bound::Udp(_, g) => g.first()?.local_addr().ok(),
            Bound::Stream(_, g) => g.first()?.local_addr().ok(),
        }
    }
    pub fn listener(&self) -> Listener {
        match self {
            Bound::Udp(l, _) | Bound::Stream(l, _) => *l,
        }
    }
}

/// One shared relay socket (`shared_relay_ports`), bound before the shards start.
pub struct SharedSocket {
    pub lease: turnpike_proto::ports::PortLease,
    pub socket: StdUdpSocket,
    pub bind: SocketAddr,
    pub advertised: SocketAddr,
}

/// Binds `per_shard` shared relay sockets for each shard on each relay address, on the lowest
/// free ports of the range (a port another process holds is skipped). The error says why
/// they do not fit.
pub fn bind_shared_ports(
    shared: &turnpike_proto::Shared,
    plan: &RelayPlan,
    shards: usize,
    per_shard: u16,
    buffer: usize,
) -> Result<Vec<Vec<SharedSocket>>, String> {
    use turnpike_proto::ports::RelayTransport;
    let mut out: Vec<Vec<SharedSocket>> = (0..shards).map(|_| Vec::new()).collect();
    if per_shard == 0 {
        return Ok(out);
    }
    // They carry the traffic of many allocations: at least a listener's buffer.
    let buffer = buffer.max(relay::RELAY_SOCKET_BUFFER);
    for (bind_ip, advertised_ip) in [plan.v4, plan.v6].into_iter().flatten() {
        let mut skipped = Vec::new();
        for sockets in out.iter_mut() {
            for _ in 0..per_shard {
                let socket = loop {
                    let Some(lease) = shared.ports.take_lowest(RelayTransport::Udp, bind_ip) else {
                        return Err(format!(
                            "{per_shard} ports x {shards} threads on {bind_ip} do not fit the \
                             free ports of relay_ports {}-{}",
                            plan.ports.0, plan.ports.1
                        ));
                    };
                    let bind = SocketAddr::new(bind_ip, lease.port());
                    match bind_udp(bind, false, buffer) {
                        Ok(socket) => {
                            break SharedSocket {
                                advertised: SocketAddr::new(advertised_ip, lease.port()),
                                lease,
                                socket,
                                bind,
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => skipped.push(lease),
                        Err(e) => return Err(format!("cannot bind {bind}: {e}")),
                    }
                };
                sockets.push(socket);
            }
        }
        if !skipped.is_empty() {
            let ports: Vec<u16> = skipped.iter().map(|l| l.port()).collect();
            tracing::warn!(?ports, "relay ports held by another process, skipped");
        }
    }
    Ok(out)
}

/// Fails when another process holds `addr`: SO_REUSEPORT would otherwise let a second relay
/// join the first one's port silently, and the kernel would split clients between them.
fn ensure_free(l: &Listener) -> std::io::Result<()> {
    if l.addr.port() == 0 {
        return Ok(());
    }
    let ty = if l.transport == Transport::Udp {
        Type::DGRAM
    } else {
        Type::STREAM
    };
    let sock = Socket::new(Domain::for_address(l.addr), ty, None)?;
    if l.addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    // SO_REUSEADDR for TCP, so connections of a previous run in TIME_WAIT do not count.
    sock.set_reuse_address(l.transport != Transport::Udp)?;
    sock.bind(&l.addr.into())
}

/// Binds every listener once per shard (SO_REUSEPORT); port 0 is resolved by the first bind.
/// A failure names the listener's index in `listen`.
pub fn bind_listeners(
    listen: &[Listener],
    shards: usize,
    buffer: usize,
) -> Result<Vec<Bound>, (usize, Error)> {
    let mut out = Vec::new();
    for (i, l) in listen.iter().enumerate() {
        out.push(bind_listener(l, shards, buffer).map_err(|e| (i, e))?);
    }
    Ok(out)
}

fn bind_listener(l: &Listener, shards: usize, buffer: usize) -> Result<Bound, Error> {
    {
        let err = |addr, source| Error::Bind {
            what: l.transport.scheme(),
            addr,
            source,
        };
        ensure_free(l).map_err(|e| err(l.addr, e))?;
        match l.transport {
            Transport::Udp => {
                let first = bind_udp(l.addr, true, buffer).map_err(|e| err(l.addr, e))?;
                let bound = first.local_addr()?;
                let mut group = vec![first];
                for _ in 1..shards {
                    group.push(bind_udp(bound, true, buffer).map_err(|e| err(bound, e))?);
                }
                Ok(Bound::Udp(Listener { addr: bound, ..*l }, group))
            }
            Transport::Tcp | Transport::Tls => {
                let first = sockets::tcp_listener(l.addr).map_err(|e| err(l.addr, e))?;
                let bound = first.local_addr()?;
                let mut group = vec![first];
                for _ in 1..shards {
                    group.push(sockets::tcp_listener(bound).map_err(|e| err(bound, e))?);
                }
                Ok(Bound::Stream(Listener { addr: bound, ..*l }, group))
            }
        }
    }
}

/// Set once, when an allocation ends; its RFC 6062 data connections, on any shard, wait for
/// it. A flag beside the wake-up, so a pipe that starts waiting after the allocation ended
/// still sees it.
#[derive(Debug, Default)]
pub struct Ended {
    flag: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl Ended {
    fn fire(&self) {
        self.flag.store(true, std::sync::atomic::Ordering::Release);
        self.notify.notify_waiters();
    }

    /// Returns once the allocation has ended.
    pub async fn wait(&self) {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.flag.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        notified.await;
    }
}

//! The tokio layer: binds sockets, runs one shard per core and carries out what the core says.
//!
//! Each shard is a thread with its own current-thread runtime, its own `Core`, and one socket
//! per listener bound with SO_REUSEPORT, so the kernel spreads clients over the shards by
//! 4-tuple hash and a shard owns every allocation made through its sockets. Nothing on the
//! packet path takes a lock or allocates: the shard's sockets and core live in `Rc`/`RefCell`,
//! datagrams are read in batches (`recvmmsg`) at an offset of four bytes so a ChannelData
//! header can be written in front without a copy, and what a turn of the event loop sends
//! leaves at its end with one `sendmmsg` per socket, GSO where datagrams share a destination
//! and size ([`batch`] has the measurements). Sends are non-blocking: a full socket buffer
//! drops the datagram, as a router would.

pub mod admission;
pub mod batch;
pub mod stream;
mod tcp_relay;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::task::JoinHandle;

use batch::{RecvBatch, TxQueue, UdpSock, BATCH, TX_MAX};

use crate::config::{Listener, Settings, Transport};
use crate::metrics::Metrics;
use crate::proto::ports::{PortLease, RelayPorts, RelayTransport};
use crate::proto::{
    AllocId, ClientAction, ClientId, Core, Event, PeerAction, PendingAllocate, RelayAddrs, Shared,
};
use crate::Error;

/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_536;
/// Batches (of up to `BATCH` datagrams) one socket handles before yielding, so a busy socket
/// cannot starve the others.
const BUDGET: usize = 4;
/// How long a port reserved by EVEN-PORT's R bit is held (RFC 8656 §7.2: about 30 s).
const RESERVATION_TTL: Duration = Duration::from_secs(30);
const RELAY_SOCKET_BUFFER: usize = 1 << 20;
/// Most ports held for EVEN-PORT reservations at once, so reservations cannot exhaust the port
/// range or file descriptors; beyond, Allocate with the R bit gets 508.
const MAX_RESERVATIONS: usize = 1024;
/// Timers, counters, and a reload's revocations are handled at this pace.
const TICK: Duration = Duration::from_millis(250);
/// Ports tried per relay socket before an Allocate gets 508: a port the registry hands out may
/// still be held by another process.
const BIND_ATTEMPTS: usize = 16;

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

fn set_buffers(sock: &Socket, bytes: usize) {
    if bytes == 0 {
        return;
    }
    // SO_RCVBUFFORCE passes net.core.rmem_max when the relay runs with CAP_NET_ADMIN.
    let fd = std::os::fd::AsRawFd::as_raw_fd(sock);
    let v = bytes as libc::c_int;
    for (opt, fallback) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        // SAFETY: fd is a valid socket for the lifetime of `sock`; the option value is a c_int.
        let forced = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if forced != 0 {
            // SAFETY: as above.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    fallback,
                    (&v as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }
}

fn udp_socket(addr: SocketAddr, reuse_port: bool, buffer: usize) -> std::io::Result<StdUdpSocket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    if reuse_port {
        sock.set_reuse_port(true)?;
    }
    set_buffers(&sock, buffer);
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    Ok(sock.into())
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

/// A bound, non-blocking TCP socket with SO_REUSEADDR and SO_REUSEPORT: listener shards
/// share an address this way, and so do an RFC 6062 allocation's listener and its outgoing
/// connections (RFC 6062 §5.2 has them leave from the relayed address, which Linux allows
/// beside a listening socket only with SO_REUSEPORT on both). An allocation's port is its own
/// by the relay's port registry, and [`pin_to_first`] keeps any other socket that joins the
/// port from receiving its peers' connections.
fn tcp_socket(addr: SocketAddr) -> std::io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    Ok(sock)
}

/// Attaches a reuseport program that hands every new connection to the first listener of the
/// port's SO_REUSEPORT group: the allocation's own, even if another socket (another process of
/// the same user) binds the port too. Set before `listen`.
fn pin_to_first(sock: &Socket) -> std::io::Result<()> {
    // One classic BPF instruction: return 0, the index of the group's first socket.
    let mut code = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let prog = libc::sock_fprog {
        len: code.len() as u16,
        filter: code.as_mut_ptr(),
    };
    // SAFETY: fd is a valid socket owned by `sock`; `prog` points at `code`, both alive for
    // the call, and the kernel copies the program.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The listening socket of an RFC 6062 allocation on `addr`. Where the kernel takes no
/// reuseport program (before Linux 4.5, some sandboxes), the registry's ownership of the port
/// is the guarantee left, and the relay says so once.
fn tcp_relay_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let sock = tcp_socket(addr)?;
    if let Err(e) = pin_to_first(&sock) {
        if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(error = %e, "TCP relay listeners run without a reuseport program");
        }
    }
    sock.listen(128)?;
    Ok(sock.into())
}

fn tcp_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let sock = tcp_socket(addr)?;
    sock.listen(1024)?;
    Ok(sock.into())
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
pub fn bind_listeners(
    listen: &[Listener],
    shards: usize,
    buffer: usize,
) -> Result<Vec<Bound>, Error> {
    let mut out = Vec::new();
    for l in listen {
        let err = |addr, source| Error::Bind {
            what: l.transport.scheme(),
            addr,
            source,
        };
        ensure_free(l).map_err(|e| err(l.addr, e))?;
        match l.transport {
            Transport::Udp => {
                let first = udp_socket(l.addr, true, buffer).map_err(|e| err(l.addr, e))?;
                let bound = first.local_addr()?;
                let mut group = vec![first];
                for _ in 1..shards {
                    group.push(udp_socket(bound, true, buffer).map_err(|e| err(bound, e))?);
                }
                out.push(Bound::Udp(Listener { addr: bound, ..*l }, group));
            }
            Transport::Tcp | Transport::Tls => {
                let first = tcp_listener(l.addr).map_err(|e| err(l.addr, e))?;
                let bound = first.local_addr()?;
                let mut group = vec![first];
                for _ in 1..shards {
                    group.push(tcp_listener(bound).map_err(|e| err(bound, e))?);
                }
                out.push(Bound::Stream(Listener { addr: bound, ..*l }, group));
            }
        }
    }
    Ok(out)
}

/// Sockets held for EVEN-PORT reservations, shared by the shards because the second Allocate
/// usually comes from another client port, which may hash to another shard.
type Reservations = Arc<Mutex<HashMap<[u8; 8], (RelaySocket, Instant)>>>;

/// A UDP relay socket on a port the registry gave it; the port is given back once the socket
/// is closed (fields drop in order).
pub struct RelaySocket {
    sock: StdUdpSocket,
    lease: PortLease,
}

struct RelaySlot {
    v4: Option<Rc<UdpSock>>,
    v6: Option<Rc<UdpSock>>,
    /// RFC 6062: the listening socket's address, which outgoing peer connections use too.
    tcp: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
    /// Ends the byte pipes of a TCP allocation's bound connections (on any shard) when the
    /// allocation ends.
    ended: Arc<Ended>,
}

impl Drop for RelaySlot {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.ended.fire();
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

struct Shard {
    core: RefCell<Core>,
    listeners: Vec<Rc<UdpSock>>,
    streams: Arc<stream::StreamContext>,
    conns: RefCell<HashMap<u32, Rc<stream::Outbox>>>,
    next_conn: Cell<u32>,
    relays: RefCell<Vec<Option<RelaySlot>>>,
    /// Receive buffers of the relay sockets' loops (each listener loop has its own).
    buf: RefCell<RecvBatch>,
    /// Datagrams sent during this turn of the event loop, flushed at its end.
    tx: RefCell<TxQueue>,
    tx_ready: tokio::sync::Notify,
    plan: RelayPlan,
    reservations: Reservations,
    ports: Arc<RelayPorts>,
    metrics: Arc<Metrics>,
}

/// Everything a shard thread needs.
pub struct ShardSetup {
    pub index: u32,
    pub shared: Arc<Shared>,
    pub sockets: Vec<StdUdpSocket>,
    pub tcp: Vec<(std::net::TcpListener, Listener)>,
    pub streams: Arc<stream::StreamContext>,
    pub plan: RelayPlan,
    pub reservations: Reservations,
    pub metrics: Arc<Metrics>,
}

pub fn new_reservations() -> Reservations {
    Arc::new(Mutex::new(HashMap::new()))
}

/// Runs one shard on the calling thread until `stop` resolves.
pub fn run_shard(setup: ShardSetup, stop: tokio::sync::watch::Receiver<bool>) -> Result<(), Error> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let mut seed = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut seed);
        let listeners = setup
            .sockets
            .into_iter()
            .map(|s| batch::register(s).map(Rc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let ports = Arc::clone(&setup.shared.ports);
        let shard = Rc::new(Shard {
            core: RefCell::new(Core::new(setup.shared, seed).with_shard(setup.index)),
            listeners,
            streams: setup.streams,
            conns: RefCell::new(HashMap::new()),
            next_conn: Cell::new(stream::STREAM_BASE),
            relays: RefCell::new(Vec::new()),
            buf: RefCell::new(RecvBatch::new(MAX_DATAGRAM)),
            tx: RefCell::new(TxQueue::new()),
            tx_ready: tokio::sync::Notify::new(),
            plan: setup.plan,
            reservations: setup.reservations,
            ports,
            metrics: setup.metrics,
        });
        for i in 0..shard.listeners.len() {
            tokio::task::spawn_local(listener_loop(Rc::clone(&shard), i));
        }
        tokio::task::spawn_local(flush_loop(Rc::clone(&shard)));
        for (l, cfg) in setup.tcp {
            let l = tokio::net::TcpListener::from_std(l)?;
            tokio::task::spawn_local(stream::accept_loop(Rc::clone(&shard), l, cfg));
        }
        let mut stop = stop;
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = tick.tick() => shard.tick(),
                _ = stop.changed() => break,
            }
        }
        shard.core.borrow_mut().free_all();
        shard.process_events();
        shard.tick();
        shard.tx.borrow_mut().flush();
        Ok(())
    })
}

/// Sends what the shard queued, once the tasks made ready in this turn of the event loop have
/// run: a task woken by the first datagram queued runs after the tasks already waiting.
async fn flush_loop(shard: Rc<Shard>) {
    loop {
        shard.tx_ready.notified().await;
        shard.tx.borrow_mut().flush();
    }
}

/// One `recvmmsg` on a registered socket: `None` when the socket is drained (its readiness
/// cleared), else the count read. A count below `BATCH` means the queue was empty, so
/// readiness is cleared without another call that would only fail with `WouldBlock`;
/// a datagram arriving after the call raises readiness again (edge-triggered epoll).
fn recv_batch(
    guard: &mut tokio::io::unix::AsyncFdReadyGuard<'_, StdUdpSocket>,
    batch: &mut RecvBatch,
) -> Option<usize> {
    match batch.recv(guard.get_inner().as_raw_fd()) {
        Ok(n) => {
            if n < BATCH {
                guard.clear_ready();
            }
            Some(n)
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            guard.clear_ready();
            None
        }
        // ICMP errors surface on later reads of a UDP socket; they concern one peer.
        Err(_) => Some(0),
    }
}

async fn listener_loop(shard: Rc<Shard>, index: usize) {
    let sock = Rc::clone(&shard.listeners[index]);
    let mut batch = RecvBatch::new(MAX_DATAGRAM);
    loop {
        let Ok(mut guard) = sock.readable().await else {
            return;
        };
        let mut drained = false;
        for _ in 0..BUDGET {
            let Some(n) = recv_batch(&mut guard, &mut batch) else {
                drained = true;
                break;
            };
            let (now, unix) = (Instant::now(), unix_now());
            for i in 0..n {
                let Some(from) = batch.source(i) else {
                    continue;
                };
                let client = ClientId {
                    listener: index as u32,
                    addr: from,
                };
                let packet = batch.payload(i);
                let action = shard
                    .core
                    .borrow_mut()
                    .handle_client(packet, client, now, unix);
                match action {
                    ClientAction::None => {}
                    ClientAction::Reply => {
                        let _ = sock.get_ref().send_to(shard.core.borrow().output(), from);
                    }
                    ClientAction::Relay {
                        alloc,
                        peer,
                        start,
                        end,
                    } => {
                        shard.send_to_peer(alloc, peer, &packet[start..end]);
                    }
                    // TCP allocations, and so Connect and ConnectionBind, exist only on streams.
                    ClientAction::Connect { .. } | ClientAction::Bind { .. } => {}
                    ClientAction::Allocate(pending) => {
                        shard.allocate(pending);
                        let _ = sock.get_ref().send_to(shard.core.borrow().output(), from);
                    }
                }
            }
            if n < BATCH && n > 0 {
                drained = true;
                break;
            }
        }
        drop(guard);
        shard.process_events();
        if !drained {
            tokio::task::yield_now().await;
        }
    }
}

/// Reads what peers send to one relay socket; holds the socket's port lease, so the port is
/// free again only once this loop and its socket are gone.
async fn relay_loop(shard: Rc<Shard>, alloc: AllocId, sock: Rc<UdpSock>, _lease: PortLease) {
    loop {
        let Ok(mut guard) = sock.readable().await else {
            return;
        };
        let mut drained = false;
        for _ in 0..BUDGET {
            let mut batch = shard.buf.borrow_mut();
            let Some(n) = recv_batch(&mut guard, &mut batch) else {
                drained = true;
                break;
            };
            let now = Instant::now();
            for i in 0..n {
                let Some(peer) = batch.source(i) else {
                    continue;
                };
                let (buf, len) = batch.slot_mut(i);
                let action = shard
                    .core
                    .borrow_mut()
                    .handle_peer(alloc, peer, buf, len, now);
                match action {
                    PeerAction::Drop => {}
                    PeerAction::ChannelData { client, len } => {
                        shard.send_to_client(client, &buf[..4 + len])
                    }
                    PeerAction::DataIndication { client } => {
                        shard.send_to_client(client, shard.core.borrow().output());
                    }
                }
            }
            if n < BATCH && n > 0 {
                drained = true;
                break;
            }
        }
        drop(guard);
        if !drained {
            tokio::task::yield_now().await;
        }
    }
}

impl Shard {
    /// Queues a datagram for the end of this turn of the event loop.
    #[inline]
    fn queue(&self, sock: &Rc<UdpSock>, to: SocketAddr, data: &[u8]) {
        let mut tx = self.tx.borrow_mut();
        if tx.is_empty() {
            self.tx_ready.notify_one();
        }
        tx.push(sock, to, data);
        if tx.len() >= TX_MAX {
            tx.flush();
        }
    }

    /// Sends to a client over its UDP listener or queues it on its stream connection.
    #[inline]
    fn send_to_client(&self, client: ClientId, data: &[u8]) {
        if client.listener < stream::STREAM_BASE {
            if let Some(l) = self.listeners.get(client.listener as usize) {
                self.queue(l, client.addr, data);
            }
        } else if let Some(conn) = self.conns.borrow().get(&client.listener) {
            conn.push(data);
        }
    }

    #[inline]
    fn send_to_peer(&self, alloc: AllocId, peer: SocketAddr, payload: &[u8]) {
        let relays = self.relays.borrow();
        let Some(Some(slot)) = relays.get(alloc.0 as usize) else {
            return;
        };
        let sock = if peer.is_ipv4() { &slot.v4 } else { &slot.v6 };
        if let Some(s) = sock {
            self.queue(s, peer, payload);
        }
    }

    fn tick(&self) {
        let mut core = self.core.borrow_mut();
        core.handle_timeout(Instant::now());
        let stats = core.take_stats();
        let tenants = core.shared().tenant_names();
        drop(core);
        self.metrics.record(&stats, &tenants);
        self.process_events();
        let now = Instant::now();
        if let Ok(mut r) = self.reservations.lock() {
            r.retain(|_, (_, exp)| *exp > now);
        }
    }

    fn process_events(&self) {
        loop {
            let event = self.core.borrow_mut().poll_event();
            match event {
                None => return,
                Some(Event::ConnectionClosed(c)) => {
                    self.streams.pending_peers().remove(&c);
                }
                Some(Event::Freed(id)) => {
                    if let Some(slot) = self.relays.borrow_mut().get_mut(id.0 as usize) {
                        *slot = None;
                    }
                    tracing::debug!(alloc = id.0, "allocation freed");
                }
            }
        }
    }

    /// Binds the relay sockets a pending Allocate asks for and completes it.
    fn allocate(self: &Rc<Self>, p: Box<PendingAllocate>) {
        // Close the sockets of allocations freed earlier in this batch first: their slots
        // may be handed to this allocation.
        self.process_events();
        if p.tcp {
            return self.allocate_tcp(*p);
        }
        let now = Instant::now();
        let (v4, v6, reserved) = match self.bind_relay(&p) {
            Ok(b) => b,
            Err(code) => {
                tracing::warn!(code, "allocation failed: no relay port");
                self.core.borrow_mut().fail_allocate(*p, code, now);
                return;
            }
        };
        // RFC 8656 §7.2: DONT-FRAGMENT the relay cannot honour is an unknown
        // comprehension-required attribute.
        if p.dont_fragment {
            if let Some(e) = [&v4, &v6]
                .into_iter()
                .flatten()
                .find_map(|s| set_dont_fragment(&s.sock).err())
            {
                tracing::warn!(error = %e, "DONT-FRAGMENT cannot be set: 420");
                self.core.borrow_mut().fail_allocate(*p, 420, now);
                return;
            }
        }
        let advertised = |s: &Option<RelaySocket>, fam: &Option<(IpAddr, IpAddr)>| {
            Some(SocketAddr::new(fam.as_ref()?.1, s.as_ref()?.lease.port()))
        };
        let relayed = RelayAddrs {
            v4: advertised(&v4, &self.plan.v4),
            v6: advertised(&v6, &self.plan.v6),
        };
        // Registered with the reactor before the allocation exists, so a failure refuses it
        // rather than advertising a port nothing reads.
        let mut registered = Vec::new();
        for (s, v6) in [(v4, false), (v6, true)] {
            let Some(RelaySocket { sock, lease }) = s else {
                continue;
            };
            match batch::register(sock) {
                Ok(sock) => registered.push((Rc::new(sock), lease, v6)),
                Err(e) => {
                    tracing::warn!(error = %e, "relay socket not registered: 508");
                    self.core.borrow_mut().fail_allocate(*p, 508, now);
                    return;
                }
            }
        }
        if let (Some(token), Some(sock)) = (p.new_token, reserved) {
            if let Ok(mut r) = self.reservations.lock() {
                r.insert(token, (sock, now + RESERVATION_TTL));
            }
        }
        let id = self.core.borrow_mut().complete_allocate(*p, relayed, now);
        let mut slot = RelaySlot {
            v4: None,
            v6: None,
            tcp: None,
            tasks: Vec::new(),
            ended: Arc::new(Ended::default()),
        };
        for (sock, lease, v6) in registered {
            slot.tasks.push(tokio::task::spawn_local(relay_loop(
                Rc::clone(self),
                id,
                Rc::clone(&sock),
                lease,
            )));
            if v6 {
                slot.v6 = Some(sock);
            } else {
                slot.v4 = Some(sock);
            }
        }
        self.install(id, slot);
        tracing::debug!(alloc = id.0, ?relayed, "allocation created");
    }

    fn install(&self, id: AllocId, slot: RelaySlot) {
        let mut relays = self.relays.borrow_mut();
        if relays.len() <= id.0 as usize {
            relays.resize_with(id.0 as usize + 1, || None);
        }
        relays[id.0 as usize] = Some(slot);
    }

    /// Sockets for (v4, v6, reserved next port), or the error code to answer.
    #[allow(clippy::type_complexity)]
    fn bind_relay(
        &self,
        p: &PendingAllocate,
    ) -> Result<
        (
            Option<RelaySocket>,
            Option<RelaySocket>,
            Option<RelaySocket>,
        ),
        u16,
    > {
        if let Some(token) = p.use_token {
            let taken = self
                .reservations
                .lock()
                .ok()
                .and_then(|mut r| r.remove(&token));
            return match taken {
                Some((s, _)) if s.lease.ip().is_ipv4() => Ok((Some(s), None, None)),
                Some((s, _)) => Ok((None, Some(s), None)),
                None => Err(508),
            };
        }
        if p.new_token.is_some()
            && self
                .reservations
                .lock()
                .map_or(true, |r| r.len() >= MAX_RESERVATIONS)
        {
            return Err(508);
        }
        let reserve = p.new_token.is_some();
        let family = |fam: &Option<(IpAddr, IpAddr)>, want: bool| {
            if !want {
                return Ok(None);
            }
            let Some((bind, _)) = fam else {
                return Err(440);
            };
            self.bind_udp(*bind, p.even_port, reserve).map(Some)
        };
        let v4 = family(&self.plan.v4, p.want_v4)?;
        let v6 = family(&self.plan.v6, p.want_v6)?;
        let (v4, r4) = v4.map_or((None, None), |(s, r)| (Some(s), r));
        let (v6, r6) = v6.map_or((None, None), |(s, r)| (Some(s), r));
        Ok((v4, v6, r4.or(r6)))
    }

    /// A UDP relay socket on `ip`, on a port the registry hands out (an even one for
    /// EVEN-PORT), and with `reserve_next` the socket of the next port too.
    fn bind_udp(
        &self,
        ip: IpAddr,
        even: bool,
        reserve_next: bool,
    ) -> Result<(RelaySocket, Option<RelaySocket>), u16> {
        let mut rng = rand::thread_rng();
        // Ports another process holds stay taken until this call ends, so they are not drawn
        // again.
        let mut refused = Vec::new();
        // Only a port in use is worth another draw; any other error would repeat.
        let bind = |lease: PortLease| match udp_socket(
            SocketAddr::new(ip, lease.port()),
            false,
            RELAY_SOCKET_BUFFER,
        ) {
            Ok(sock) => Ok(RelaySocket { sock, lease }),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(Some(lease)),
            Err(e) => {
                tracing::warn!(error = %e, %ip, "cannot bind a relay socket");
                Err(None)
            }
        };
        for _ in 0..BIND_ATTEMPTS {
            let lease = self
                .ports
                .take(RelayTransport::Udp, ip, even, &mut rng)
                .ok_or(508u16)?;
            let next = if reserve_next {
                let port = lease.port().checked_add(1);
                match port.and_then(|n| self.ports.take_port(RelayTransport::Udp, ip, n)) {
                    Some(l) => Some(l),
                    None => {
                        refused.push(lease);
                        continue;
                    }
                }
            } else {
                None
            };
            let first = match bind(lease) {
                Ok(s) => s,
                Err(None) => return Err(508),
                Err(Some(lease)) => {
                    refused.push(lease);
                    refused.extend(next);
                    continue;
                }
            };
            let Some(next) = next else {
                return Ok((first, None));
            };
            match bind(next) {
                Ok(second) => return Ok((first, Some(second))),
                Err(None) => return Err(508),
                Err(Some(lease)) => {
                    refused.push(lease);
                    refused.push(first.lease);
                }
            }
        }
        Err(508)
    }
}

/// Sets the DF bit on what the socket sends (RFC 8656 §14/§15): IP_PMTUDISC_DO for IPv4,
/// IPV6_DONTFRAG for IPv6.
fn set_dont_fragment(s: &StdUdpSocket) -> std::io::Result<()> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(s);
    let is_v4 = s.local_addr().is_ok_and(|a| a.is_ipv4());
    let (level, opt, val) = if is_v4 {
        (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 1)
    };
    // SAFETY: fd is a valid socket owned by `s`; the option value is a c_int.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&val as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

//! One shard: a thread with a current-thread runtime, its `Core`, its listener sockets and
//! the relay sockets of its allocations, and the loops that feed the core and carry out what
//! it answers. Timers come from [`Core::poll_timeout`]; a tick four times a second exports the
//! counters and notices a reload.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::RngCore;

use turnpike_proto::{ClientAction, ClientId, Core, PeerAction, Shared};
use turnpike_udp::{Poller, RecvBatch, TxQueue, UdpSock, BATCH};

use super::state::Shard;
use super::{stream, unix_now, SharedSocket};
use crate::config::Listener;
use crate::metrics::Metrics;
use crate::Error;

/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_536;
/// Batches (of up to `BATCH` datagrams) one socket handles before yielding, so a busy socket
/// cannot starve the others.
const BUDGET: usize = 4;
/// Counters are exported, and a reload's revocations noticed, at this pace.
const TICK: Duration = Duration::from_millis(250);
/// Poller tokens from here on are the shared relay sockets (by their place in
/// `Shard::shared_socks`); below, allocations' own ([`relay_token`]).
const SHARED_TOKEN: usize = usize::MAX / 2;

/// Everything a shard thread needs.
pub struct ShardSetup {
    pub index: u32,
    pub shared: Arc<Shared>,
    pub sockets: Vec<StdUdpSocket>,
    pub tcp: Vec<(std::net::TcpListener, Listener)>,
    pub streams: Arc<stream::StreamContext>,
    pub metrics: Arc<Metrics>,
    /// Shared relay sockets, none unless `shared_relay_ports` is set.
    pub shared_ports: Vec<SharedSocket>,
    pub fleet: Arc<crate::fleet::Fleet>,
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
            .map(|s| turnpike_udp::register(s).map(Rc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let (poller, registry) = Poller::new()?;
        let mut core = Core::new(setup.shared, seed).with_shard(setup.index);
        let mut shared_socks = Vec::new();
        for (i, s) in setup.shared_ports.into_iter().enumerate() {
            let id = core.add_shared_port(s.lease, s.bind, s.advertised);
            let sock = UdpSock::unregistered(s.socket);
            registry.add(&sock, SHARED_TOKEN + i)?;
            shared_socks.push((id, s.bind, Rc::new(sock)));
        }
        let shard = Rc::new(Shard {
            core: RefCell::new(core),
            listeners,
            streams: setup.streams,
            conns: RefCell::new(HashMap::new()),
            next_conn: Cell::new(stream::STREAM_BASE),
            relays: RefCell::new(Vec::new()),
            registry,
            shared_socks,
            buf: RefCell::new(RecvBatch::new(MAX_DATAGRAM)),
            out: RefCell::new(Vec::with_capacity(1500)),
            tx: RefCell::new(TxQueue::new()),
            tx_ready: tokio::sync::Notify::new(),
            metrics: setup.metrics,
            fleet: setup.fleet,
            index: setup.index,
        });
        for i in 0..shard.listeners.len() {
            tokio::task::spawn_local(listener_loop(Rc::clone(&shard), i));
        }
        tokio::task::spawn_local(relay_loop(Rc::clone(&shard), poller));
        tokio::task::spawn_local(flush_loop(Rc::clone(&shard)));
        for (l, cfg) in setup.tcp {
            let l = tokio::net::TcpListener::from_std(l)?;
            tokio::task::spawn_local(stream::accept_loop(Rc::clone(&shard), l, cfg));
        }
        let mut stop = stop;
        let mut tick = tokio::time::interval(TICK);
        loop {
            // The core's next deadline, looked at again after every tick: a deadline input
            // brought forward is met within a tick of being set, and none is earlier than a
            // second after its input.
            let next = shard.core.borrow().poll_timeout();
            let due =
                tokio::time::sleep_until(next.unwrap_or_else(|| Instant::now() + TICK).into());
            tokio::select! {
                _ = tick.tick() => shard.tick(),
                _ = due => shard.timeout(),
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
    guard: &mut tokio::io::unix::AsyncFdReadyGuard<'_, turnpike_udp::socket::Fd>,
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
                let action = shard.core.borrow_mut().handle_client(
                    packet,
                    client,
                    now,
                    unix,
                    &mut shard.out.borrow_mut(),
                );
                match action {
                    ClientAction::None => {}
                    ClientAction::Reply => {
                        let _ = sock.get_ref().send_to(&shard.out.borrow(), from);
                    }
                    ClientAction::Relay {
                        alloc,
                        peer,
                        start,
                        end,
                    } => {
                        shard.send_to_peer(alloc, peer, &packet[start..end]);
                    }
                    ClientAction::Allocate(bind) => {
                        shard.allocate(bind);
                        let out = shard.out.borrow();
                        if !out.is_empty() {
                            let _ = sock.get_ref().send_to(&out, from);
                        }
                    }
                    // TCP allocations, and so Connect and ConnectionBind, exist only on streams.
                    ClientAction::Connect { .. } | ClientAction::DataConnection { .. } => {}
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

/// Reads what peers send to the relay sockets of every allocation of the shard: one task,
/// woken when any of them is readable, reads all that are in one turn of the event loop, so
/// what they relay leaves in the same flush. A socket not drained within its budget is read
/// again in the next turn, after the other tasks had theirs.
pub(super) async fn relay_loop(shard: Rc<Shard>, mut poller: Poller) {
    let mut ready = Vec::new();
    let mut pending: Vec<usize> = Vec::new();
    loop {
        if pending.is_empty() {
            if let Err(e) = poller.wait(&mut ready).await {
                tracing::error!(error = %e, "relay sockets cannot be polled");
                return;
            }
        } else {
            let _ = poller.take(&mut ready);
            ready.append(&mut pending);
        }
        for &token in &ready {
            if !shard.read_relay(token) {
                pending.push(token);
            }
        }
        ready.clear();
        if !pending.is_empty() {
            pending.sort_unstable();
            pending.dedup();
            tokio::task::yield_now().await;
        }
    }
}

impl Shard {
    /// Reads up to [`BUDGET`] batches from the relay socket behind `token`; false when it
    /// holds more.
    fn read_relay(&self, token: usize) -> bool {
        if let Some(i) = token.checked_sub(SHARED_TOKEN) {
            let Some((port, _, sock)) = self.shared_socks.get(i) else {
                return true;
            };
            let port = *port;
            return self.read_peers(sock, |core, peer, buf, len, now, out| {
                core.handle_shared_peer(port, peer, buf, len, now, out)
            });
        }
        let (alloc, sock) = {
            let relays = self.relays.borrow();
            let Some(Some(slot)) = relays.get(token / 2) else {
                return true;
            };
            // A token of an ended allocation whose slot now holds one on the shared sockets,
            // which are read through their own tokens, where peers are told apart.
            if slot.shared {
                return true;
            }
            let sock = if token % 2 == 1 { &slot.v6 } else { &slot.v4 };
            let Some(sock) = sock else {
                return true;
            };
            (slot.id, Rc::clone(sock))
        };
        self.read_peers(&sock, |core, peer, buf, len, now, out| {
            core.handle_peer(alloc, peer, buf, len, now, out)
        })
    }

    /// Reads up to [`BUDGET`] batches of peer datagrams from a relay socket, `handle` telling
    /// the core about each; false when the socket holds more.
    #[inline]
    fn read_peers(
        &self,
        sock: &UdpSock,
        mut handle: impl FnMut(
            &mut Core,
            SocketAddr,
            &mut [u8],
            usize,
            Instant,
            &mut Vec<u8>,
        ) -> PeerAction,
    ) -> bool {
        let fd = sock.as_raw_fd();
        for _ in 0..BUDGET {
            let mut batch = self.buf.borrow_mut();
            let n = match batch.recv(fd) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                // ICMP errors surface on later reads of a UDP socket; they concern one peer.
                Err(_) => continue,
            };
            let now = Instant::now();
            for i in 0..n {
                let Some(peer) = batch.source(i) else {
                    continue;
                };
                let (buf, len) = batch.slot_mut(i);
                let action = handle(
                    &mut self.core.borrow_mut(),
                    peer,
                    buf,
                    len,
                    now,
                    &mut self.out.borrow_mut(),
                );
                match action {
                    PeerAction::Drop => {}
                    PeerAction::ChannelData { client, len } => {
                        self.send_to_client(client, &buf[..4 + len])
                    }
                    PeerAction::DataIndication { client } => {
                        self.send_to_client(client, &self.out.borrow());
                    }
                }
            }
            if n < BATCH {
                return true;
            }
        }
        false
    }

    /// The core's timers are due.
    fn timeout(&self) {
        self.core.borrow_mut().handle_timeout(Instant::now());
        self.process_events();
    }

    /// Exports the counters; lets the core see a reload (its timeout checks the generation).
    fn tick(&self) {
        let mut core = self.core.borrow_mut();
        let now = Instant::now();
        core.handle_timeout(now);
        // An operator's requests: allocations to end, and a list to answer.
        for (id, answer) in self.fleet.board.ends_for(self.index) {
            let _ = answer.send(core.end(id));
        }
        let tenants = core.shared().tenant_names();
        if let Some(request) = self.fleet.board.wanted(self.index) {
            let list = core
                .allocations(now)
                .iter()
                .map(|a| crate::fleet::LiveAllocation::of(self.index, a, &tenants))
                .collect();
            self.fleet.board.answer(self.index, request, list);
        }
        let stats = core.take_stats();
        drop(core);
        self.metrics.record(&stats, &tenants);
        self.metrics
            .send_buffer_full(self.tx.borrow_mut().take_dropped());
        self.process_events();
    }
}

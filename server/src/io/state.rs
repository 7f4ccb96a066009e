//! A shard's state, which its loops (`shard`), its relay sockets (`relay`, `tcp_relay`) and its
//! stream connections (`stream`) share on the shard's thread: the core, the sockets, the
//! connections, what the turn sends; and how it carries out what the core says to send.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use tokio::task::JoinHandle;

use turnpike_proto::{AllocId, ClientId, Core, Event, SharedPortId};
use turnpike_udp::{PollRegistry, RecvBatch, TxQueue, UdpSock, TX_MAX};

use super::conn::{Outbox, StreamContext};
use super::Ended;
use crate::metrics::Metrics;

/// One shard's state.
pub(super) struct Shard {
    pub(super) core: RefCell<Core>,
    pub(super) listeners: Vec<Rc<UdpSock>>,
    pub(super) streams: Arc<StreamContext>,
    pub(super) conns: RefCell<HashMap<u32, Rc<Outbox>>>,
    pub(super) next_conn: Cell<u32>,
    /// Relay sockets by allocation slot ([`AllocId::index`]).
    pub(super) relays: RefCell<Vec<Option<RelaySlot>>>,
    /// Where relay sockets are added to the shard's [`Poller`].
    pub(super) registry: PollRegistry,
    /// The shared relay sockets (`shared_relay_ports`): the core's id, where each is bound.
    pub(super) shared_socks: Vec<(SharedPortId, SocketAddr, Rc<UdpSock>)>,
    /// Receive buffer of the relay loop (each listener loop has its own).
    pub(super) buf: RefCell<RecvBatch>,
    /// The buffer the core writes its answers into.
    pub(super) out: RefCell<Vec<u8>>,
    /// Datagrams sent during this turn of the event loop, flushed at its end.
    pub(super) tx: RefCell<TxQueue>,
    pub(super) tx_ready: tokio::sync::Notify,
    pub(super) metrics: Arc<Metrics>,
    /// The admin API's board and the session records.
    pub(super) fleet: Arc<crate::fleet::Fleet>,
    pub(super) index: u32,
}

/// The sockets and tasks of one allocation, indexed by its slot.
pub(super) struct RelaySlot {
    /// The allocation these belong to: an event for an older allocation of the slot is
    /// ignored.
    pub(super) id: AllocId,
    pub(super) v4: Option<Rc<UdpSock>>,
    pub(super) v6: Option<Rc<UdpSock>>,
    /// `v4` and `v6` are the shard's shared relay sockets, which outlive the allocation.
    pub(super) shared: bool,
    /// RFC 6062: the listening socket's address, which outgoing peer connections use too.
    pub(super) tcp: Option<SocketAddr>,
    /// The listening socket, shared with its accept task: shut down the moment the
    /// allocation ends (the task closes it a little later), so that no connection reaches it
    /// in between. Held here, so the descriptor shut down is always this socket's.
    pub(super) tcp_listener: Option<Rc<tokio::net::TcpListener>>,
    pub(super) tasks: Vec<JoinHandle<()>>,
    /// Ends the byte pipes of a TCP allocation's bound connections (on any shard) when the
    /// allocation ends.
    pub(super) ended: Arc<Ended>,
}

impl Drop for RelaySlot {
    fn drop(&mut self) {
        if let Some(l) = &self.tcp_listener {
            // Only stops it listening: the socket closes when its task lets go of it too.
            let _ = socket2::SockRef::from(&**l).shutdown(std::net::Shutdown::Both);
        }
        for t in &self.tasks {
            t.abort();
        }
        self.ended.fire();
    }
}

/// The poller's token of an allocation's relay socket.
pub(super) fn relay_token(alloc: AllocId, v6: bool) -> usize {
    alloc.index() * 2 + usize::from(v6)
}

impl Shard {
    /// Queues a datagram for the end of this turn of the event loop, as part of `flow`: the
    /// flows of one socket take turns when its buffer fills (`TxQueue::flush`).
    #[inline]
    pub(super) fn queue(&self, sock: &Rc<UdpSock>, to: SocketAddr, flow: u64, data: &[u8]) {
        let mut tx = self.tx.borrow_mut();
        if tx.is_empty() {
            self.tx_ready.notify_one();
        }
        tx.push(sock, to, flow, data);
        if tx.len() >= TX_MAX {
            tx.flush();
        }
    }

    /// Sends to a client over its UDP listener or queues it on its stream connection.
    #[inline]
    pub(super) fn send_to_client(&self, client: ClientId, data: &[u8]) {
        if !client.is_stream() {
            if let Some(l) = self.listeners.get(client.listener as usize) {
                // A client's flow on a listener: its allocation's, one per client address.
                use std::hash::BuildHasher;
                let flow = rustc_hash::FxBuildHasher.hash_one(client.addr);
                self.queue(l, client.addr, flow, data);
            }
        } else if let Some(conn) = self.conns.borrow().get(&client.listener) {
            conn.push(data);
        }
    }

    #[inline]
    pub(super) fn send_to_peer(&self, alloc: AllocId, peer: SocketAddr, payload: &[u8]) {
        let relays = self.relays.borrow();
        let Some(Some(slot)) = relays.get(alloc.index()) else {
            return;
        };
        if slot.id != alloc {
            return;
        }
        let sock = if peer.is_ipv4() { &slot.v4 } else { &slot.v6 };
        if let Some(s) = sock {
            self.queue(s, peer, alloc.index() as u64, payload);
        }
    }

    /// The shared relay socket bound at `bind`.
    pub(super) fn shared_socket(&self, bind: SocketAddr) -> Option<Rc<UdpSock>> {
        self.shared_socks
            .iter()
            .find(|(_, b, _)| *b == bind)
            .map(|(_, _, s)| Rc::clone(s))
    }

    pub(super) fn process_events(&self) {
        loop {
            let event = self.core.borrow_mut().poll_event();
            match event {
                None => return,
                Some(Event::ConnectionClosed(c)) => {
                    self.streams.pending_peers().remove(&c);
                }
                Some(Event::Ended(s)) => {
                    let tenants = self.core.borrow().shared().tenant_names();
                    let record = crate::fleet::SessionRecord::of(&s, &tenants);
                    if !self.fleet.sessions.record(&record) {
                        self.metrics.session_record_dropped();
                    }
                }
                Some(Event::Freed(id)) => {
                    let mut relays = self.relays.borrow_mut();
                    if let Some(slot) = relays.get_mut(id.index()) {
                        // A stale event (the slot holds a newer allocation) touches nothing.
                        if slot.as_ref().is_some_and(|s| s.id == id) {
                            if let Some(s) = slot.take() {
                                if !s.shared {
                                    for sock in [&s.v4, &s.v6].into_iter().flatten() {
                                        self.registry.remove(sock);
                                    }
                                }
                            }
                        }
                    }
                    tracing::debug!(alloc = id.index(), "allocation freed");
                }
            }
        }
    }
}

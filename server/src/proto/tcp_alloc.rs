//! RFC 6062 TCP allocations: Connect, ConnectionBind and ConnectionAttempt.
//!
//! A TCP allocation's relayed address is a listening TCP socket. The client asks for an
//! outgoing connection with Connect (on its control connection), or learns of an incoming one
//! from a ConnectionAttempt indication; either way it then opens a new data connection and
//! sends ConnectionBind with the CONNECTION-ID, after which that connection carries the peer's
//! bytes unframed. Connection ids live in [`Shared`], since the data connection may land on
//! another shard than the allocation; the IO layer holds the sockets.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::RngCore;

use super::*;

/// RFC 6062 §5.3: a connection not bound within 30 seconds is closed.
const BIND_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub(super) struct TcpConn {
    shard: u32,
    pub(super) alloc: AllocId,
    peer: SocketAddr,
    username: String,
    /// Unbound after this instant, the peer connection is closed.
    deadline: Instant,
    /// Connect in progress: the request to answer when the IO layer reports back.
    connecting: Option<(ClientId, TransactionId, Authenticated)>,
}

impl Shared {
    fn tcp_conns(&self) -> std::sync::MutexGuard<'_, HashMap<u32, TcpConn>> {
        self.tcp_conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Core {
    fn add_tcp_connection(&mut self, conn: TcpConn) -> u32 {
        let mut conns = self.shared.tcp_conns();
        loop {
            let id = self.rng.next_u32();
            if id != 0 && !conns.contains_key(&id) {
                conns.insert(id, conn);
                return id;
            }
        }
    }

    /// Connect (RFC 6062 §5.2).
    pub(super) fn connect(
        &mut self,
        msg: &Message<'_>,
        client: ClientId,
        auth: &Authenticated,
        existing: Option<AllocId>,
        now: Instant,
    ) -> Result<ClientAction, u16> {
        let Some(id) = existing else {
            return Err(437);
        };
        if !self.slot(id).is_some_and(|a| a.tcp) {
            return Err(400);
        }
        let value = msg.get(attr::XOR_PEER_ADDRESS).ok_or(400u16)?;
        let peer = self.check_peer(msg, value, id)?;
        let shard = self.shard;
        if self
            .shared
            .tcp_conns()
            .values()
            .any(|c| c.shard == shard && c.alloc == id && c.peer == peer)
        {
            return Err(446);
        }
        let connection = self.add_tcp_connection(TcpConn {
            shard,
            alloc: id,
            peer,
            username: auth.username.clone(),
            deadline: now + BIND_DEADLINE,
            connecting: Some((client, msg.transaction_id(), auth.clone())),
        });
        Ok(ClientAction::Connect {
            alloc: id,
            peer,
            connection,
        })
    }

    /// Reports how a Connect ended. The response is in `output()`, for the returned client.
    pub fn connect_done(
        &mut self,
        connection: u32,
        connected: bool,
        now: Instant,
    ) -> Option<ClientId> {
        let (client, tid, auth) = {
            let mut conns = self.shared.tcp_conns();
            let conn = conns.get_mut(&connection)?;
            let pending = conn.connecting.take()?;
            conn.deadline = now + BIND_DEADLINE;
            if !connected {
                conns.remove(&connection);
            }
            pending
        };
        let shared = Arc::clone(&self.shared);
        let code = if connected { 0 } else { 447 };
        self.count(auth.tenant, method::CONNECT, code);
        let class = if connected {
            Class::Success
        } else {
            Class::Error
        };
        let mut b = Builder::new(&mut self.out, class, method::CONNECT, tid);
        if connected {
            b.u32(attr::CONNECTION_ID, connection);
        } else {
            b.error(447, reason(447));
        }
        sign(&mut b, &shared, &auth);
        Some(client)
    }

    /// A peer connected to a TCP allocation's relayed address. With a permission for its IP,
    /// returns the control connection to tell and the new connection id, with the
    /// ConnectionAttempt indication in `output()`; without one the IO layer closes it.
    pub fn peer_connected(
        &mut self,
        alloc: AllocId,
        peer: SocketAddr,
        now: Instant,
    ) -> Option<(ClientId, u32)> {
        let peer = SocketAddr::new(normalize(peer.ip()), peer.port());
        let a = self.slot(alloc)?;
        if !a.has_permission(peer.ip(), now) {
            self.stats.dropped_packets += 1;
            return None;
        }
        let (client, username) = (a.client, a.username.clone());
        let connection = self.add_tcp_connection(TcpConn {
            shard: self.shard,
            alloc,
            peer,
            username,
            deadline: now + BIND_DEADLINE,
            connecting: None,
        });
        let mut tid = [0u8; 16];
        tid[..4].copy_from_slice(&stun::MAGIC_COOKIE.to_be_bytes());
        self.rng.fill_bytes(&mut tid[4..]);
        Builder::new(
            &mut self.out,
            Class::Indication,
            method::CONNECTION_ATTEMPT,
            TransactionId(tid),
        )
        .xor_address(attr::XOR_PEER_ADDRESS, peer)
        .u32(attr::CONNECTION_ID, connection)
        .fingerprint();
        Some((client, connection))
    }

    /// ConnectionBind (RFC 6062 §5.4), on a new connection that holds no allocation; any
    /// shard may receive it.
    pub(super) fn connection_bind(
        &mut self,
        msg: &Message<'_>,
        auth: &Authenticated,
        existing: Option<AllocId>,
    ) -> Result<u32, u16> {
        if existing.is_some() {
            return Err(400);
        }
        let connection = msg.get_u32(attr::CONNECTION_ID).ok_or(400u16)?;
        let mut conns = self.shared.tcp_conns();
        let conn = conns.get(&connection).ok_or(400u16)?;
        if conn.connecting.is_some() {
            return Err(400);
        }
        if conn.username != auth.username {
            return Err(441);
        }
        conns.remove(&connection);
        Ok(connection)
    }

    /// Drops this shard's connection ids that match, telling the IO layer to close them.
    pub(super) fn forget_tcp_connections(&mut self, mut which: impl FnMut(&TcpConn) -> bool) {
        let shard = self.shard;
        let events = &mut self.events;
        self.shared.tcp_conns().retain(|id, c| {
            let forget = c.shard == shard && which(c);
            if forget {
                events.push_back(Event::ConnectionClosed(*id));
            }
            !forget
        });
    }

    pub(super) fn expire_tcp_connections(&mut self, now: Instant) {
        self.forget_tcp_connections(|c| c.deadline <= now && c.connecting.is_none());
    }
}

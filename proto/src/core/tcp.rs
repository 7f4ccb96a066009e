//! RFC 6062 TCP allocations: Connect, ConnectionBind and ConnectionAttempt.
//!
//! A TCP allocation's relayed address is a listening TCP socket. The client asks for an
//! outgoing connection with Connect (on its control connection), or learns of an incoming one
//! from a ConnectionAttempt indication; either way it then opens a new data connection and
//! sends ConnectionBind with the CONNECTION-ID, after which that connection carries the peer's
//! bytes unframed. Connection ids live in [`Shared`], since the data connection may land on
//! another shard than the allocation; the IO layer holds the sockets. A connection stays
//! registered while it is bound, until the IO layer reports its end, so that an allocation
//! holds at most `max_tcp_connections` at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::RngCore;

use crate::auth::Authenticated;
use crate::policy::normalize;
use crate::quota::{AtomicBucket, UserState};
use crate::stun::{self, attr, method, Builder, Class, Message, TransactionId};

use super::responses::{reason, sign};
use super::shared::lock;
use super::{AllocId, ClientAction, ClientId, Core, Event, Shared};

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
    /// A ConnectionBind joined it with a data connection.
    bound: bool,
    quota: TcpQuota,
}

/// What a bound data connection is charged against and counted as: its allocation's tenant,
/// user and bandwidth. Bytes wait (TCP cannot drop them) until every bucket has room.
#[derive(Debug, Clone)]
pub struct TcpQuota {
    pub tenant: u32,
    pub user: Arc<UserState>,
    pub allocation: Option<Arc<AtomicBucket>>,
    /// What the allocation's data connections carried, on whichever shard they run: the
    /// allocation adds it to its own counts (its listing, its session record, usage).
    pub usage: Arc<StreamUsage>,
}

/// Packets (reads) and bytes an RFC 6062 allocation's data connections relayed, each way
/// (up: client to peer). Shared by the connections, which may run on other shards than the
/// allocation.
#[derive(Debug, Default)]
pub struct StreamUsage {
    packets: [std::sync::atomic::AtomicU64; 2],
    bytes: [std::sync::atomic::AtomicU64; 2],
}

impl StreamUsage {
    /// Counts one read of `bytes` relayed towards the peer (`to_peer`) or the client.
    pub fn add(&self, to_peer: bool, bytes: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let d = usize::from(!to_peer);
        self.packets[d].fetch_add(1, Relaxed);
        self.bytes[d].fetch_add(bytes as u64, Relaxed);
    }

    /// What was counted so far.
    pub fn usage(&self) -> super::Usage {
        use std::sync::atomic::Ordering::Relaxed;
        super::Usage {
            packets: [self.packets[0].load(Relaxed), self.packets[1].load(Relaxed)],
            bytes: [self.bytes[0].load(Relaxed), self.bytes[1].load(Relaxed)],
        }
    }
}

impl TcpQuota {
    /// The most bytes one read may take: a quarter of the smallest bucket (which holds a
    /// second's worth), so a read never waits for a bucket that other traffic keeps from
    /// filling up.
    pub fn max_chunk(&self, want: usize) -> usize {
        let rates = [
            self.allocation.as_ref().map(|b| b.rate()),
            self.user.min_rate(),
        ];
        let least = rates.into_iter().flatten().min().unwrap_or(u64::MAX) / 4;
        want.min(usize::try_from(least).unwrap_or(usize::MAX))
            .max(1)
    }

    /// Takes `bytes` from every bucket, or nothing (false: wait and ask again).
    pub fn allow(&self, shared: &Shared, now: Instant, bytes: usize) -> bool {
        let now_ms = shared.millis(now);
        if !self
            .allocation
            .as_ref()
            .is_none_or(|b| b.allow(now_ms, bytes as i64))
        {
            return false;
        }
        if self.user.allow(now_ms, bytes) {
            return true;
        }
        if let Some(b) = &self.allocation {
            b.refund(bytes as i64);
        }
        false
    }
}

/// Every shard's RFC 6062 connections by id, and the ids of each allocation (keyed by shard
/// and allocation), at most `max_tcp_connections` each: so the limit and the 446 check look
/// at one allocation's few connections, not at all of them.
#[derive(Debug, Default)]
pub(super) struct TcpConns {
    by_id: HashMap<u32, TcpConn>,
    per_alloc: HashMap<(u32, AllocId), Vec<u32>>,
}

impl TcpConns {
    fn of(&self, shard: u32, alloc: AllocId) -> &[u32] {
        self.per_alloc
            .get(&(shard, alloc))
            .map_or(&[][..], Vec::as_slice)
    }

    fn insert(&mut self, id: u32, conn: TcpConn) {
        self.per_alloc
            .entry((conn.shard, conn.alloc))
            .or_default()
            .push(id);
        self.by_id.insert(id, conn);
    }

    fn remove(&mut self, id: u32) -> Option<TcpConn> {
        let conn = self.by_id.remove(&id)?;
        let key = (conn.shard, conn.alloc);
        if let Some(ids) = self.per_alloc.get_mut(&key) {
            ids.retain(|x| *x != id);
            if ids.is_empty() {
                self.per_alloc.remove(&key);
            }
        }
        Some(conn)
    }
}

impl Shared {
    fn tcp_conns(&self) -> std::sync::MutexGuard<'_, TcpConns> {
        lock(&self.tcp_conns)
    }

    /// A bound RFC 6062 data connection closed (on any shard): its allocation may hold
    /// another.
    pub fn connection_ended(&self, connection: u32) {
        self.tcp_conns().remove(connection);
    }
}

impl Core {
    /// Registers a connection of allocation `alloc`, or None when it holds its most already.
    fn add_tcp_connection(
        &mut self,
        alloc: AllocId,
        peer: SocketAddr,
        deadline: Instant,
        connecting: Option<(ClientId, TransactionId, Authenticated)>,
    ) -> Option<u32> {
        let max = self.shared.config().max_tcp_connections;
        let a = self.slot(alloc)?;
        let conn = TcpConn {
            shard: self.shard,
            alloc,
            peer,
            username: a.username.clone(),
            deadline,
            connecting,
            bound: false,
            quota: TcpQuota {
                tenant: a.tenant,
                user: Arc::clone(&a.user),
                allocation: a.tcp_bucket.clone(),
                usage: Arc::clone(&a.tcp_usage),
            },
        };
        let mut conns = self.shared.tcp_conns();
        if conns.of(self.shard, alloc).len() >= max {
            return None;
        }
        let id = loop {
            let id = self.rng.next_u32();
            if id != 0 && !conns.by_id.contains_key(&id) {
                conns.insert(id, conn);
                break id;
            }
        };
        drop(conns);
        self.timers.connection(id, deadline);
        Some(id)
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
        let duplicate = {
            let conns = self.shared.tcp_conns();
            conns
                .of(self.shard, id)
                .iter()
                .any(|c| conns.by_id.get(c).is_some_and(|c| c.peer == peer))
        };
        if duplicate {
            return Err(446);
        }
        let connecting = Some((client, msg.transaction_id(), auth.clone()));
        let Some(connection) = self.add_tcp_connection(id, peer, now + BIND_DEADLINE, connecting)
        else {
            return Err(508);
        };
        Ok(ClientAction::Connect {
            alloc: id,
            peer,
            connection,
        })
    }

    /// Reports how a Connect ended. The answer is written into `out`, for the returned
    /// client; None when the connection's allocation has ended meanwhile.
    pub fn connect_done(
        &mut self,
        connection: u32,
        connected: bool,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Option<ClientId> {
        let (client, tid, auth) = {
            let mut conns = self.shared.tcp_conns();
            let conn = conns.by_id.get_mut(&connection)?;
            let pending = conn.connecting.take()?;
            conn.deadline = now + BIND_DEADLINE;
            if !connected {
                conns.remove(connection);
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
        if connected {
            self.timers.connection(connection, now + BIND_DEADLINE);
        }
        let mut b = Builder::new(out, class, method::CONNECT, tid);
        if connected {
            b.u32(attr::CONNECTION_ID, connection);
        } else {
            b.error(447, reason(447));
        }
        sign(&mut b, &shared, &auth);
        Some(client)
    }

    /// A peer connected to a TCP allocation's relayed address. With a permission for its IP
    /// (and room for another connection), returns the control connection to tell and the new
    /// connection id, with the ConnectionAttempt indication written into `out`; otherwise the
    /// caller closes the peer's connection.
    pub fn peer_connected(
        &mut self,
        alloc: AllocId,
        peer: SocketAddr,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Option<(ClientId, u32)> {
        let peer = SocketAddr::new(normalize(peer.ip()), peer.port());
        let a = self.slot(alloc)?;
        if !a.has_permission(peer.ip(), now) {
            self.stats.dropped_packets += 1;
            return None;
        }
        let client = a.client;
        let Some(connection) = self.add_tcp_connection(alloc, peer, now + BIND_DEADLINE, None)
        else {
            self.stats.dropped_packets += 1;
            return None;
        };
        let mut tid = [0u8; 16];
        tid[..4].copy_from_slice(&stun::MAGIC_COOKIE.to_be_bytes());
        self.rng.fill_bytes(&mut tid[4..]);
        Builder::new(
            out,
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
    ) -> Result<(u32, TcpQuota), u16> {
        if existing.is_some() {
            return Err(400);
        }
        let connection = msg.get_u32(attr::CONNECTION_ID).ok_or(400u16)?;
        let mut conns = self.shared.tcp_conns();
        let conn = conns.by_id.get_mut(&connection).ok_or(400u16)?;
        if conn.connecting.is_some() || conn.bound {
            return Err(400);
        }
        if conn.username != auth.username {
            return Err(441);
        }
        conn.bound = true;
        Ok((connection, conn.quota.clone()))
    }

    /// Counts bytes a bound data connection carried (`to_peer`: client to peer); one read is
    /// counted as one packet.
    pub fn count_stream_bytes(&mut self, quota: &TcpQuota, to_peer: bool, bytes: usize) {
        let d = usize::from(!to_peer);
        let t = self.stats.tenant(quota.tenant);
        t.relayed_packets[d] += 1;
        t.relayed_bytes[d] += bytes as u64;
        quota.usage.add(to_peer, bytes);
    }

    /// Drops every connection of allocation `alloc` (it ended), telling the IO layer to close
    /// them.
    pub(super) fn forget_tcp_connections(&mut self, alloc: AllocId) {
        let mut conns = self.shared.tcp_conns();
        let ids = conns.of(self.shard, alloc).to_vec();
        for id in ids {
            conns.remove(id);
            self.events.push_back(Event::ConnectionClosed(id));
        }
    }

    /// The deadline of connection `id` came: closed unless bound, connecting, or given more
    /// time since.
    pub(super) fn connection_due(&mut self, id: u32, now: Instant) {
        let mut conns = self.shared.tcp_conns();
        let Some(c) = conns.by_id.get(&id) else {
            return;
        };
        if c.shard != self.shard || c.bound || c.connecting.is_some() {
            return;
        }
        if c.deadline > now {
            let at = c.deadline;
            drop(conns);
            self.timers.connection(id, at);
            return;
        }
        conns.remove(id);
        drop(conns);
        self.events.push_back(Event::ConnectionClosed(id));
    }
}

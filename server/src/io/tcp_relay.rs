//! RFC 6062 sockets: the listening socket of a TCP allocation, outgoing peer connections for
//! Connect, and the byte pipe between a bound data connection and its peer.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use super::{RelaySlot, Shard};
use crate::proto::{AllocId, PendingAllocate, RelayAddrs};

/// RFC 6062 §5.2: how long a Connect may take before it fails with 447.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

impl Shard {
    /// Binds the listening socket of a TCP allocation and completes it.
    pub(super) fn allocate_tcp(self: &Rc<Self>, p: PendingAllocate) {
        let now = Instant::now();
        let fam = if p.want_v6 {
            self.plan.v6
        } else {
            self.plan.v4
        };
        let (lo, hi) = self.plan.ports;
        let bound = fam.and_then(|(bind, advertised)| {
            let mut rng = rand::thread_rng();
            (0..64).find_map(|_| {
                let addr = SocketAddr::new(bind, rng.gen_range(lo..=hi));
                let sock = super::tcp_socket(addr).ok()?;
                sock.listen(128).ok()?;
                let listener = TcpListener::from_std(sock.into()).ok()?;
                Some((listener, addr, SocketAddr::new(advertised, addr.port())))
            })
        });
        let Some((listener, local, advertised)) = bound else {
            self.core.borrow_mut().fail_allocate(p, 508, now);
            return;
        };
        let relayed = if local.is_ipv4() {
            RelayAddrs {
                v4: Some(advertised),
                v6: None,
            }
        } else {
            RelayAddrs {
                v4: None,
                v6: Some(advertised),
            }
        };
        let id = self.core.borrow_mut().complete_allocate(p, relayed, now);
        let slot = RelaySlot {
            v4: None,
            v6: None,
            tcp: Some(local),
            tasks: vec![tokio::task::spawn_local(accept_peers(
                Rc::clone(self),
                id,
                listener,
            ))],
            ended: Arc::new(tokio::sync::Notify::new()),
        };
        self.install(id, slot);
        tracing::debug!(alloc = id.0, %advertised, "TCP allocation created");
    }

    /// Opens the connection a Connect asked for and answers the client.
    pub(super) fn start_connect(
        self: &Rc<Self>,
        alloc: AllocId,
        peer: SocketAddr,
        connection: u32,
    ) {
        let local = self
            .relays
            .borrow()
            .get(alloc.0 as usize)
            .and_then(|s| s.as_ref()?.tcp);
        let shard = Rc::clone(self);
        tokio::task::spawn_local(async move {
            let attempt = async {
                let local = local.ok_or_else(|| std::io::Error::other("no TCP relay"))?;
                let sock = super::tcp_socket(local)?;
                tokio::net::TcpSocket::from_std_stream(sock.into())
                    .connect(peer)
                    .await
            };
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, attempt)
                .await
                .ok()
                .and_then(Result::ok);
            let now = Instant::now();
            let client = shard
                .core
                .borrow_mut()
                .connect_done(connection, stream.is_some(), now);
            if let Some(client) = client {
                shard.send_to_client(client, shard.core.borrow().output());
            }
            if let Some(s) = stream {
                shard.hold_peer(connection, alloc, s);
            }
        });
    }

    /// Keeps a peer connection until a ConnectionBind claims it, on whichever shard.
    fn hold_peer(&self, connection: u32, alloc: AllocId, stream: tokio::net::TcpStream) {
        let _ = stream.set_nodelay(true);
        let ended = self
            .relays
            .borrow()
            .get(alloc.0 as usize)
            .and_then(|s| Some(Arc::clone(&s.as_ref()?.ended)));
        if let (Some(ended), Ok(std)) = (ended, stream.into_std()) {
            self.streams
                .pending_peers()
                .insert(connection, (std, ended));
        }
    }

    /// Joins a bound data connection with its peer connection until either side closes or
    /// the allocation ends. `early` holds bytes the client sent right after ConnectionBind.
    pub(super) async fn pipe<S>(
        &self,
        connection: u32,
        mut client: S,
        early: &[u8],
    ) -> std::io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let Some((peer, ended)) = self.streams.pending_peers().remove(&connection) else {
            return Ok(());
        };
        let mut peer = tokio::net::TcpStream::from_std(peer)?;
        let ended = ended.notified();
        peer.write_all(early).await?;
        tokio::select! {
            r = tokio::io::copy_bidirectional(&mut client, &mut peer) => r.map(|_| ()),
            _ = ended => Ok(()),
        }
    }
}

async fn accept_peers(shard: Rc<Shard>, alloc: AllocId, listener: TcpListener) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let now = Instant::now();
        let attempt = shard.core.borrow_mut().peer_connected(alloc, peer, now);
        let Some((client, connection)) = attempt else {
            continue;
        };
        shard.send_to_client(client, shard.core.borrow().output());
        shard.hold_peer(connection, alloc, stream);
    }
}

//! RFC 6062 sockets: the listening socket of a TCP allocation, outgoing peer connections for
//! Connect, and the byte pipe between a bound data connection and its peer.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use super::state::Shard;
use turnpike_proto::{AllocId, TcpQuota};

/// RFC 6062 §5.2: how long a Connect may take before it fails with 447.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes read at once from either side of a data connection.
const PIPE_CHUNK: usize = 16 * 1024;
/// How often a data connection whose quota is spent looks again.
const QUOTA_WAIT: Duration = Duration::from_millis(10);

impl Shard {
    /// Opens the connection a Connect asked for and answers the client. The attempt belongs
    /// to the allocation: it is stopped when the allocation ends.
    pub(super) fn start_connect(
        self: &Rc<Self>,
        alloc: AllocId,
        peer: SocketAddr,
        connection: u32,
    ) {
        let local = self
            .relays
            .borrow()
            .get(alloc.index())
            .and_then(|s| s.as_ref().filter(|s| s.id == alloc)?.tcp);
        let shard = Rc::clone(self);
        let task = tokio::task::spawn_local(async move {
            let attempt = async {
                let local = local.ok_or_else(|| std::io::Error::other("no TCP relay"))?;
                let sock = super::sockets::tcp_socket(local)?;
                tokio::net::TcpSocket::from_std_stream(sock.into())
                    .connect(peer)
                    .await
            };
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, attempt)
                .await
                .ok()
                .and_then(Result::ok);
            let now = Instant::now();
            let client = shard.core.borrow_mut().connect_done(
                connection,
                stream.is_some(),
                now,
                &mut shard.out.borrow_mut(),
            );
            // None: the connection id is gone (its allocation ended meanwhile).
            let Some(client) = client else {
                return;
            };
            shard.send_to_client(client, &shard.out.borrow());
            if let Some(s) = stream {
                shard.hold_peer(connection, alloc, s);
            }
        });
        match self.relays.borrow_mut().get_mut(alloc.index()) {
            Some(Some(slot)) if slot.id == alloc => slot.tasks.push(task),
            Some(Some(_) | None) | None => task.abort(),
        }
    }

    /// Forgets an RFC 6062 connection everywhere: its peer socket if it still waits for a
    /// ConnectionBind, and its place among its allocation's connections.
    pub(super) fn end_connection(&self, connection: u32) {
        self.streams.pending_peers().remove(&connection);
        self.core.borrow().shared().connection_ended(connection);
    }

    /// Keeps a peer connection until a ConnectionBind claims it, on whichever shard.
    fn hold_peer(&self, connection: u32, alloc: AllocId, stream: tokio::net::TcpStream) {
        let _ = stream.set_nodelay(true);
        let ended = self
            .relays
            .borrow()
            .get(alloc.index())
            .and_then(|s| Some(Arc::clone(&s.as_ref().filter(|s| s.id == alloc)?.ended)));
        if let (Some(ended), Ok(std)) = (ended, stream.into_std()) {
            self.streams
                .pending_peers()
                .insert(connection, (std, ended));
        }
    }

    /// Joins a bound data connection with its peer connection until both sides have closed,
    /// either fails, or the allocation ends; the bytes are charged to `quota` and counted in
    /// the metrics. `early` holds bytes the client sent right after ConnectionBind.
    pub(super) async fn pipe<S>(
        &self,
        connection: u32,
        client: S,
        early: &[u8],
        quota: TcpQuota,
    ) -> std::io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let taken = self.streams.pending_peers().remove(&connection);
        let result = match taken {
            None => Ok(()),
            Some((peer, ended)) => match tokio::net::TcpStream::from_std(peer) {
                Err(e) => Err(e),
                Ok(peer) => {
                    let ended = ended.wait();
                    let (mut client_rd, mut client_wr) = tokio::io::split(client);
                    let (mut peer_rd, mut peer_wr) = tokio::io::split(peer);
                    let both = async {
                        self.charge(&quota, early.len(), true).await;
                        peer_wr.write_all(early).await?;
                        let up = self.relay_bytes(&mut client_rd, &mut peer_wr, &quota, true);
                        let down = self.relay_bytes(&mut peer_rd, &mut client_wr, &quota, false);
                        tokio::try_join!(up, down).map(|_| ())
                    };
                    tokio::select! {
                        r = both => r,
                        _ = ended => Ok(()),
                    }
                }
            },
        };
        self.end_connection(connection);
        result
    }

    /// Copies one direction of a data connection until end of stream, each read waiting until
    /// the quotas have room for it.
    async fn relay_bytes<R, W>(
        &self,
        from: &mut R,
        to: &mut W,
        quota: &TcpQuota,
        to_peer: bool,
    ) -> std::io::Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut buf = vec![0u8; quota.max_chunk(PIPE_CHUNK)];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return to.shutdown().await;
            }
            self.charge(quota, n, to_peer).await;
            to.write_all(&buf[..n]).await?;
        }
    }

    /// Waits until the quotas let `bytes` through, then counts them. More than the smallest
    /// bucket holds is taken in parts.
    async fn charge(&self, quota: &TcpQuota, bytes: usize, to_peer: bool) {
        let shared = Arc::clone(self.core.borrow().shared());
        let part = quota.max_chunk(bytes);
        let mut left = bytes;
        while left > 0 {
            let n = left.min(part);
            while !quota.allow(&shared, Instant::now(), n) {
                tokio::time::sleep(QUOTA_WAIT).await;
            }
            left -= n;
        }
        if bytes > 0 {
            self.core
                .borrow_mut()
                .count_stream_bytes(quota, to_peer, bytes);
        }
    }
}

/// Accepts the peers of one TCP allocation (closed by the core without a permission or beyond
/// the allocation's connection limit).
pub(super) async fn accept_peers(shard: Rc<Shard>, alloc: AllocId, listener: Rc<TcpListener>) {
    let mut backoff = crate::admission::AcceptBackoff::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                backoff.failed(&e, "TCP relay").await;
                continue;
            }
        };
        backoff.reset();
        let now = Instant::now();
        let attempt =
            shard
                .core
                .borrow_mut()
                .peer_connected(alloc, peer, now, &mut shard.out.borrow_mut());
        let Some((client, connection)) = attempt else {
            continue;
        };
        shard.send_to_client(client, &shard.out.borrow());
        shard.hold_peer(connection, alloc, stream);
    }
}

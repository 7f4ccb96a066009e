//! What a shard's stream connections share (the listeners' context) and what each holds
//! towards its client (the outbox and its writer).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::admission::Admission;

/// What every shard's stream listeners share.
pub struct StreamContext {
    /// The TLS configuration; replaced on reload.
    pub tls: arc_swap::ArcSwapOption<rustls::ServerConfig>,
    /// Existing web server HTTPS is passed to, TLS untouched.
    pub upstream: Option<SocketAddr>,
    /// SNI names sent to the upstream; empty means every HTTP client when an upstream is set.
    pub web_hostnames: Vec<String>,
    /// Connections per source, and without an allocation in all.
    pub admission: Arc<Admission>,
    /// From accept to the first TURN frame or the end of the HTTP request headers: the PROXY
    /// header, the TLS handshake and the first bytes must all arrive within it. HTTP
    /// connections get it again for each further request's headers (keep-alive).
    pub handshake_timeout: Duration,
    /// A connection that holds no allocation is closed after this long without a byte; a
    /// write to a client that makes no progress for this long closes its connection.
    pub idle_timeout: Duration,
    /// A connection that never held an allocation (a TURN stream, an HTTP connection) is
    /// closed this long after its accept, whatever it sends.
    pub unallocated_lifetime: Duration,
    /// The long-poll echo's path and longest hold: an HTTP request's answer is due within the
    /// handshake timeout, or that hold beside it for the long-poll echo.
    pub long_poll: Option<(&'static str, Duration)>,
    pub http: axum::Router,
    /// RFC 6062 peer connections waiting for their ConnectionBind, which any shard may get:
    /// the socket, and the wake-up for when its allocation ends.
    pub pending: Mutex<HashMap<u32, (std::net::TcpStream, Arc<super::Ended>)>>,
    /// TLS handshakes clients refused, for the browser test.
    pub tls_refusals: Arc<crate::tls_seen::TlsRefusals>,
}

impl StreamContext {
    pub(super) fn pending_peers(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u32, (std::net::TcpStream, Arc<super::Ended>)>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why a stream connection was closed: the `reason` label of the closings counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// The client closed it, or it failed on the way.
    Client,
    /// It did not say what it is (PROXY header, TLS handshake, first frame) in time.
    Handshake,
    /// It held no allocation for `unallocated_lifetime`, whatever it sent.
    Lifetime,
    /// It held no allocation and sent nothing for the idle timeout.
    Idle,
    /// Its client does not read: its outbox overflowed while it held no allocation, or a
    /// write to it made no progress for the idle timeout.
    NotReading,
    /// What it sent is neither TURN nor HTTP, or too long.
    Malformed,
    /// It held no allocation when no more such connections were allowed.
    Unallocated,
}

impl Close {
    pub const ALL: [Close; 7] = [
        Close::Client,
        Close::Handshake,
        Close::Lifetime,
        Close::Idle,
        Close::NotReading,
        Close::Malformed,
        Close::Unallocated,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Close::Client => "client",
            Close::Handshake => "handshake_timeout",
            Close::Lifetime => "unallocated_lifetime",
            Close::Idle => "idle",
            Close::NotReading => "not_reading",
            Close::Malformed => "malformed",
            Close::Unallocated => "unallocated_limit",
        }
    }
}

/// What an outbox holds at most: a connection without an allocation gets only small answers
/// (Binding, 401), so one that does not read them is closed once this fills.
pub(super) const UNALLOCATED_OUTBOX: usize = 4096;
/// What it holds with an allocation; beyond, frames for the client are dropped, as a full UDP
/// buffer would drop them (a quarter second of a 8 Mbit/s call).
pub(super) const OUTBOX_MAX: usize = 256 * 1024;
/// What the writer takes from the outbox at once.
const WRITE_CHUNK: usize = 16 * 1024;
/// An outbox's buffer, once emptied, shrinks back to this.
const OUTBOX_KEEP: usize = 4096;

/// Bytes waiting to be written to one stream client, and the writer's wake-up. It holds at
/// most its limit (plus the chunk being written), never more.
pub struct Outbox {
    buf: RefCell<VecDeque<u8>>,
    limit: Cell<usize>,
    pub(super) notify: Notify,
    pub(super) closed: Cell<bool>,
    /// Set when the connection must end (its client does not read); `broken` wakes its
    /// reader.
    failed: Cell<Option<Close>>,
    broken: Notify,
    /// Frames dropped because the outbox was full.
    pub(super) dropped: Cell<u64>,
}

impl Outbox {
    pub(super) fn new() -> Self {
        Outbox {
            buf: RefCell::new(VecDeque::new()),
            limit: Cell::new(UNALLOCATED_OUTBOX),
            notify: Notify::new(),
            closed: Cell::new(false),
            failed: Cell::new(None),
            broken: Notify::new(),
            dropped: Cell::new(0),
        }
    }

    /// The connection holds an allocation (`true`) or not: what the outbox may hold.
    pub(super) fn set_allocated(&self, allocated: bool) {
        self.limit.set(if allocated {
            OUTBOX_MAX
        } else {
            UNALLOCATED_OUTBOX
        });
    }

    /// Queues one frame, padded to a multiple of four bytes as streams require for
    /// ChannelData (RFC 8656 §12.5). A frame that does not fit is dropped whole; without an
    /// allocation, the connection is then closed (its client does not read what it asked).
    pub fn push(&self, frame: &[u8]) -> bool {
        let pad = (4 - frame.len() % 4) % 4;
        let mut buf = self.buf.borrow_mut();
        if self.closed.get() || self.failed.get().is_some() {
            return false;
        }
        if buf.len() + frame.len() + pad > self.limit.get() {
            self.dropped.set(self.dropped.get() + 1);
            if self.limit.get() == UNALLOCATED_OUTBOX {
                self.fail(Close::NotReading);
            }
            return false;
        }
        buf.extend(frame);
        buf.extend(&[0u8; 3][..pad]);
        drop(buf);
        self.notify.notify_one();
        true
    }

    /// Ends the connection for `why`: its reader stops at once.
    fn fail(&self, why: Close) {
        if self.failed.get().is_none() {
            self.failed.set(Some(why));
        }
        self.broken.notify_one();
    }

    /// Returns once the connection must end, and why.
    pub(super) async fn broken(&self) -> Close {
        loop {
            if let Some(why) = self.failed.get() {
                return why;
            }
            self.broken.notified().await;
        }
    }

    /// Bytes held now (for tests and limits).
    pub(super) fn held(&self) -> usize {
        self.buf.borrow().len()
    }
}

/// Writes what the outbox gathers, a chunk at a time; a write that makes no progress for
/// `stall` (the client does not read) ends the connection. Once the outbox is closed and
/// empty, hands the write half back (for an RFC 6062 data connection to go on with).
pub(super) async fn write_loop<W: AsyncWrite + Unpin>(
    outbox: Rc<Outbox>,
    mut wr: W,
    stall: Duration,
) -> Option<W> {
    let mut chunk = [0u8; WRITE_CHUNK];
    loop {
        loop {
            let n = {
                let mut buf = outbox.buf.borrow_mut();
                let (front, _) = buf.as_slices();
                let n = front.len().min(WRITE_CHUNK);
                chunk[..n].copy_from_slice(&front[..n]);
                buf.drain(..n);
                if buf.is_empty() && buf.capacity() > OUTBOX_KEEP {
                    buf.shrink_to(OUTBOX_KEEP);
                }
                n
            };
            if n == 0 {
                break;
            }
            let write = async {
                wr.write_all(&chunk[..n]).await?;
                wr.flush().await
            };
            match tokio::time::timeout(stall, write).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    outbox.fail(Close::Client);
                    return None;
                }
                Err(_) => {
                    outbox.fail(Close::NotReading);
                    return None;
                }
            }
        }
        if outbox.closed.get() {
            return Some(wr);
        }
        outbox.notify.notified().await;
    }
}

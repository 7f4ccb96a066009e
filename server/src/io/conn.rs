//! What a shard's stream connections share (the listeners' context) and what each holds
//! towards its client (the outbox and its writer).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::admission::Admission;

/// Most bytes queued towards one slow stream client before datagrams for it are dropped.
const OUTBOX_MAX: usize = 1 << 20;

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
    /// A connection that holds no allocation is closed after this long without a byte.
    pub idle_timeout: Duration,
    /// The long-poll echo's path and longest hold: an HTTP request's answer is due within the
    /// handshake timeout, or that hold beside it for the long-poll echo.
    pub long_poll: Option<(&'static str, Duration)>,
    pub http: axum::Router,
    /// RFC 6062 peer connections waiting for their ConnectionBind, which any shard may get:
    /// the socket, and the wake-up for when its allocation ends.
    pub pending: Mutex<HashMap<u32, (std::net::TcpStream, Arc<super::Ended>)>>,
}

impl StreamContext {
    pub(super) fn pending_peers(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u32, (std::net::TcpStream, Arc<super::Ended>)>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Bytes waiting to be written to one stream client, and the writer's wake-up.
pub struct Outbox {
    buf: RefCell<Vec<u8>>,
    pub(super) notify: Notify,
    pub(super) closed: Cell<bool>,
}

impl Outbox {
    pub(super) fn new() -> Self {
        Outbox {
            buf: RefCell::new(Vec::new()),
            notify: Notify::new(),
            closed: Cell::new(false),
        }
    }

    /// Queues one frame, padded to a multiple of four bytes as streams require for
    /// ChannelData (RFC 8656 §12.5); a frame that does not fit is dropped whole.
    pub fn push(&self, frame: &[u8]) -> bool {
        let pad = (4 - frame.len() % 4) % 4;
        let mut buf = self.buf.borrow_mut();
        if self.closed.get() || buf.len() + frame.len() + pad > OUTBOX_MAX {
            return false;
        }
        buf.extend_from_slice(frame);
        buf.extend_from_slice(&[0u8; 3][..pad]);
        drop(buf);
        self.notify.notify_one();
        true
    }
}

/// Writes what the outbox gathers; once the outbox is closed and empty, hands the write half
/// back (for an RFC 6062 data connection to go on with).
pub(super) async fn write_loop<W: AsyncWrite + Unpin>(outbox: Rc<Outbox>, mut wr: W) -> Option<W> {
    let mut spare = Vec::new();
    loop {
        loop {
            std::mem::swap(&mut *outbox.buf.borrow_mut(), &mut spare);
            if spare.is_empty() {
                break;
            }
            if wr.write_all(&spare).await.is_err() || wr.flush().await.is_err() {
                return None;
            }
            spare.clear();
        }
        if outbox.closed.get() {
            return Some(wr);
        }
        outbox.notify.notified().await;
    }
}

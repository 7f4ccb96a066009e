//! The data phase of one allocation (a flow): paced, batched sends; echoes received, matched
//! and answered; periodic refreshes. One task per flow on the multi-threaded runtime.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::UdpSocket;
use turnpike_proto::stun::{attr, method, Class};

use super::packet::{set_echo, Framing, Header, Incoming, Tracker, ECHO, PROBE};
use crate::turn::{error_code, Credentials, Stream};
use turnpike_udp::{RecvBatch, SendBatch, BATCH};

/// Packets sent in one wakeup at most; a flow behind schedule catches up over several.
const MAX_PER_TICK: usize = 4 * BATCH;
/// Receive batches handled per wakeup before yielding to other flows.
const RECV_BUDGET: usize = 16;

/// What every flow shares: the clock, live counters for the progress bar and the drain, and
/// the RTT histogram (sharded so flows seldom wait on each other's lock).
pub struct Shared {
    pub epoch: Instant,
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub histograms: Vec<Mutex<Histogram<u64>>>,
}

impl Shared {
    pub fn new(shards: usize) -> Shared {
        Shared {
            epoch: Instant::now(),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            histograms: (0..shards.max(1))
                .map(|_| {
                    Mutex::new(
                        Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| {
                            Histogram::new(3).unwrap_or_else(|_| unreachable!("3 digits"))
                        }),
                    )
                })
                .collect(),
        }
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn merge(&self, flow: u32, rtts: &mut Vec<u64>) {
        if rtts.is_empty() {
            return;
        }
        let shard = flow as usize % self.histograms.len();
        if let Ok(mut h) = self.histograms[shard].lock() {
            for &r in rtts.iter() {
                h.saturating_record(r);
            }
        }
        rtts.clear();
    }
}

/// One flow's plan.
pub struct Plan {
    pub index: u32,
    pub framing: Framing,
    pub size: usize,
    /// Packets per second (0: hold the allocation idle).
    pub rate: f64,
    /// When to send the first packet and when to stop sending.
    pub start: Instant,
    pub until: Instant,
    /// ChannelBind or CreatePermission to repeat, to keep the path alive: `None` for raw.
    pub keepalive: Option<Keepalive>,
    /// How often the allocation is refreshed and its channel (or permission) bound again.
    pub refresh: Duration,
}

pub struct Keepalive {
    pub creds: Credentials,
    pub target: SocketAddr,
    pub channel: Option<u16>,
}

impl Keepalive {
    /// Refresh of the allocation, then ChannelBind or CreatePermission, signed.
    fn packets(&mut self, lifetime_zero: bool, out: &mut Vec<Vec<u8>>) {
        let (refresh, _) = self.creds.build(method::REFRESH, Class::Request, &|b| {
            if lifetime_zero {
                b.u32(attr::LIFETIME, 0);
            }
        });
        out.push(refresh);
        if lifetime_zero {
            return;
        }
        let target = self.target;
        let (bind, _) = match self.channel {
            Some(ch) => self
                .creds
                .build(method::CHANNEL_BIND, Class::Request, &|b| {
                    b.u32(attr::CHANNEL_NUMBER, u32::from(ch) << 16)
                        .xor_address(attr::XOR_PEER_ADDRESS, target);
                }),
            None => self
                .creds
                .build(method::CREATE_PERMISSION, Class::Request, &|b| {
                    b.xor_address(attr::XOR_PEER_ADDRESS, target);
                }),
        };
        out.push(bind);
    }

    /// A 438 (stale nonce) answer to a refresh: learn the new nonce and send again.
    fn on_response(&mut self, msg: &turnpike_proto::stun::Message<'_>) -> bool {
        if msg.class() == Class::Error && error_code(msg).0 == 438 {
            self.creds.learn(msg);
            return true;
        }
        false
    }
}

/// The pacing: how many packets are due now.
struct Pacer {
    start: Instant,
    rate: f64,
    issued: u64,
}

impl Pacer {
    fn due(&mut self, now: Instant) -> usize {
        if now < self.start || self.rate <= 0.0 {
            return 0;
        }
        let want = ((now - self.start).as_secs_f64() * self.rate) as u64 + 1;
        let n = want.saturating_sub(self.issued).min(MAX_PER_TICK as u64);
        self.issued += n;
        n as usize
    }
}

fn tick_period(rate: f64) -> Duration {
    if rate <= 0.0 {
        return Duration::from_secs(3600);
    }
    Duration::from_secs_f64((1.0 / rate).clamp(0.001, 1.0))
}

/// Handles one payload: an echo of ours is measured; a probe from the other client (c2c) is
/// echoed back through `reply`.
fn on_payload(
    plan: &Plan,
    shared: &Shared,
    t: &mut Tracker,
    payload: &[u8],
    reply: &mut dyn FnMut(&[u8]),
) {
    let Some(h) = Header::read(payload) else {
        return;
    };
    match h.kind {
        ECHO if h.flow == plan.index => {
            let before = t.received;
            t.on_echo(h.seq, h.sent_ns, shared.now_ns());
            shared
                .received
                .fetch_add(t.received - before, Ordering::Relaxed);
        }
        PROBE => reply(payload),
        _ => {}
    }
}

fn write_probe(plan: &Plan, shared: &Shared, seq: u64, out: &mut Vec<u8>) {
    let h = Header {
        kind: PROBE,
        flow: plan.index,
        seq,
        sent_ns: shared.now_ns(),
    };
    plan.framing
        .frame(plan.size, out, |o| h.write(plan.size, o));
}

fn write_echo(plan: &Plan, payload: &[u8], out: &mut Vec<u8>) {
    let at = out.len() + framing_prefix_len(&plan.framing);
    plan.framing
        .frame(payload.len(), out, |o| o.extend_from_slice(payload));
    set_echo(&mut out[at..at + payload.len()]);
}

fn framing_prefix_len(f: &Framing) -> usize {
    match f {
        Framing::Raw => 0,
        Framing::Channel { .. } => 4,
        Framing::Send { prefix } => prefix.len(),
    }
}

/// A flow over a UDP socket connected to the relay (or to a forwarder, raw).
pub async fn run_udp(
    mut plan: Plan,
    sock: UdpSocket,
    shared: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Tracker {
    let fd = sock.as_raw_fd();
    let mut t = Tracker::new();
    let mut pacer = Pacer {
        start: plan.start,
        rate: plan.rate,
        issued: 0,
    };
    let mut out = SendBatch::new();
    let mut inbox = RecvBatch::new(plan.size + 512);
    let mut ticker = tokio::time::interval_at(plan.start.into(), tick_period(plan.rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut refresh =
        tokio::time::interval_at((Instant::now() + plan.refresh).into(), plan.refresh);
    let mut sending = plan.rate > 0.0;
    let mut control = Vec::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            r = sock.readable() => {
                if r.is_err() {
                    break;
                }
                for _ in 0..RECV_BUDGET {
                    match sock.try_io(tokio::io::Interest::READABLE, || inbox.recv(fd)) {
                        Ok(n) => {
                            let mut resend = false;
                            for i in 0..n {
                                let d = inbox.payload_mut(i);
                                match plan.framing.unwrap(d) {
                                    Incoming::Payload(p) => on_payload(&plan, &shared, &mut t, p, &mut |p| {
                                        out.push_with(None, |o| write_echo(&plan, p, o));
                                    }),
                                    Incoming::Stun(msg) => {
                                        if let Some(k) = plan.keepalive.as_mut() {
                                            resend |= k.on_response(&msg);
                                        }
                                    }
                                    Incoming::Other => {}
                                }
                            }
                            if resend {
                                if let Some(k) = plan.keepalive.as_mut() {
                                    k.packets(false, &mut control);
                                }
                            }
                            if n < BATCH {
                                break;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        // An ICMP error from an earlier send; the socket goes on.
                        Err(_) => continue,
                    }
                }
                if !out.is_empty() {
                    let _ = sock.try_io(tokio::io::Interest::WRITABLE, || out.flush(fd));
                }
                shared.merge(plan.index, &mut t.rtts_us);
            }
            _ = ticker.tick(), if sending => {
                let now = Instant::now();
                if now >= plan.until {
                    sending = false;
                    continue;
                }
                let due = pacer.due(now);
                let mut sent = 0;
                for _ in 0..due {
                    let seq = t.sent + sent as u64 + out.len() as u64;
                    out.push_with(None, |o| write_probe(&plan, &shared, seq, o));
                    if out.is_full() {
                        sent += out.len();
                        let _ = sock.try_io(tokio::io::Interest::WRITABLE, || out.flush(fd));
                    }
                }
                sent += out.len();
                let _ = sock.try_io(tokio::io::Interest::WRITABLE, || out.flush(fd));
                // Sequence numbers count what was handed to the kernel or dropped by a full
                // buffer alike: a drop there is a loss the report must show.
                t.sent += sent as u64;
                shared.sent.fetch_add(sent as u64, Ordering::Relaxed);
            }
            _ = refresh.tick() => {
                if let Some(k) = plan.keepalive.as_mut() {
                    k.packets(false, &mut control);
                }
            }
        }
        for p in control.drain(..) {
            let _ = sock.try_send(&p);
        }
    }
    if let Some(k) = plan.keepalive.as_mut() {
        k.packets(true, &mut control);
        for p in control.drain(..) {
            let _ = sock.try_send(&p);
        }
    }
    shared.merge(plan.index, &mut t.rtts_us);
    t
}

/// A flow over a TCP or TLS connection: a writer task paces probes and carries echoes and
/// refreshes; this task reads and measures.
pub async fn run_stream(
    plan: Plan,
    stream: Box<dyn Stream>,
    leftover: Vec<u8>,
    shared: Arc<Shared>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Tracker {
    let (reader, writer) = tokio::io::split(stream);
    let plan = Arc::new(Mutex::new(plan));
    let replies = Arc::new((Mutex::new(Vec::<u8>::new()), tokio::sync::Notify::new()));
    let writer = tokio::spawn(stream_writer(
        Arc::clone(&plan),
        writer,
        Arc::clone(&replies),
        Arc::clone(&shared),
        stop.clone(),
    ));
    let mut t = stream_reader(&plan, reader, leftover, &replies, &shared, stop).await;
    t.sent = writer.await.unwrap_or(0);
    t
}

async fn stream_reader(
    plan: &Arc<Mutex<Plan>>,
    mut reader: ReadHalf<Box<dyn Stream>>,
    mut buf: Vec<u8>,
    replies: &Arc<(Mutex<Vec<u8>>, tokio::sync::Notify)>,
    shared: &Shared,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Tracker {
    let mut t = Tracker::new();
    // The framing and index never change during the run; copy them out of the lock.
    let (framing, index, size) = match plan.lock() {
        Ok(p) => (p.framing.clone(), p.index, p.size),
        Err(_) => return t,
    };
    let local = Plan {
        index,
        framing,
        size,
        rate: 0.0,
        start: Instant::now(),
        until: Instant::now(),
        keepalive: None,
        refresh: Duration::MAX,
    };
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let mut consumed = 0;
        let mut echoes = Vec::new();
        let mut stale = false;
        while buf.len() - consumed >= 4 {
            let rest = &buf[consumed..];
            let len = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
            let total = if rest[0] & 0xC0 == 0x40 {
                4 + ((len + 3) & !3)
            } else {
                20 + len
            };
            if rest.len() < total {
                break;
            }
            match local.framing.unwrap(&rest[..total]) {
                Incoming::Payload(p) => on_payload(&local, shared, &mut t, p, &mut |p| {
                    write_echo(&local, p, &mut echoes);
                }),
                Incoming::Stun(msg) => {
                    if let Ok(mut p) = plan.lock() {
                        if let Some(k) = p.keepalive.as_mut() {
                            stale |= k.on_response(&msg);
                        }
                    }
                }
                Incoming::Other => {}
            }
            consumed += total;
        }
        buf.drain(..consumed);
        if stale {
            if let Ok(mut p) = plan.lock() {
                if let Some(k) = p.keepalive.as_mut() {
                    let mut control = Vec::new();
                    k.packets(false, &mut control);
                    echoes.extend(control.concat());
                }
            }
        }
        if !echoes.is_empty() {
            if let Ok(mut q) = replies.0.lock() {
                q.extend_from_slice(&echoes);
            }
            replies.1.notify_one();
        }
        shared.merge(index, &mut t.rtts_us);
        tokio::select! {
            _ = stop.changed() => break,
            r = reader.read(&mut chunk) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            },
        }
    }
    t
}

async fn stream_writer(
    plan: Arc<Mutex<Plan>>,
    mut writer: WriteHalf<Box<dyn Stream>>,
    replies: Arc<(Mutex<Vec<u8>>, tokio::sync::Notify)>,
    shared: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> u64 {
    let (start, until, rate, every) = match plan.lock() {
        Ok(p) => (p.start, p.until, p.rate, p.refresh),
        Err(_) => return 0,
    };
    let mut pacer = Pacer {
        start,
        rate,
        issued: 0,
    };
    let mut ticker = tokio::time::interval_at(start.into(), tick_period(rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut refresh = tokio::time::interval_at((Instant::now() + every).into(), every);
    let mut sending = rate > 0.0;
    let mut sent = 0u64;
    let mut out = Vec::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            _ = replies.1.notified() => {}
            _ = ticker.tick(), if sending => {
                let now = Instant::now();
                if now >= until {
                    sending = false;
                } else if let Ok(p) = plan.lock() {
                    let due = pacer.due(now);
                    for i in 0..due {
                        write_probe(&p, &shared, sent + i as u64, &mut out);
                    }
                    sent += due as u64;
                    shared.sent.fetch_add(due as u64, Ordering::Relaxed);
                }
            }
            _ = refresh.tick() => {
                if let Ok(mut p) = plan.lock() {
                    if let Some(k) = p.keepalive.as_mut() {
                        let mut control = Vec::new();
                        k.packets(false, &mut control);
                        out.extend(control.concat());
                    }
                }
            }
        }
        if let Ok(mut q) = replies.0.lock() {
            out.append(&mut q);
        }
        if !out.is_empty() {
            // One write carries every frame due: the batching of a stream.
            if writer.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
        }
    }
    if let Ok(mut p) = plan.lock() {
        if let Some(k) = p.keepalive.as_mut() {
            let mut control = Vec::new();
            k.packets(true, &mut control);
            out.extend(control.concat());
        }
    }
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        let _ = writer.write_all(&out).await;
        let _ = writer.shutdown().await;
    })
    .await;
    sent
}

/// A peer the generator runs: echoes every load packet back to where it came from (the
/// relayed address), marked as an echo.
pub async fn run_peer(sock: UdpSocket, size: usize, mut stop: tokio::sync::watch::Receiver<bool>) {
    let fd = sock.as_raw_fd();
    let mut inbox = RecvBatch::new(size + 64);
    let mut out = SendBatch::new();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            r = sock.readable() => {
                if r.is_err() {
                    return;
                }
                for _ in 0..RECV_BUDGET {
                    match sock.try_io(tokio::io::Interest::READABLE, || inbox.recv(fd)) {
                        Ok(n) => {
                            for i in 0..n {
                                let from = inbox.source(i);
                                let d = inbox.payload_mut(i);
                                set_echo(d);
                                out.push_with(from, |o| o.extend_from_slice(d));
                            }
                            let _ = sock.try_io(tokio::io::Interest::WRITABLE, || out.flush(fd));
                            if n < BATCH {
                                break;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => continue,
                    }
                }
            }
        }
    }
}

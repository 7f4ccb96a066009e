//! `turnpike-probe load`: many concurrent allocations against one relay, each sending
//! sequence-numbered, timestamped packets through channels or Send indications at a set rate,
//! to UDP peers this process runs (which echo them back through the relay) or to another of
//! its allocations (client to client). The report counts loss, reordering and duplicates and
//! gives RTT percentiles from an HDR histogram and RFC 3550 jitter.
//!
//! The layout: [`packet`] is the wire format and the per-flow bookkeeping (no IO); `flow` runs
//! one allocation's data phase; this file sets the run up (connect, Allocate, ChannelBind),
//! paces it, drains it and reports. Flows are tasks on a multi-threaded runtime; UDP flows
//! send and receive with `sendmmsg`/`recvmmsg`, stream flows write every frame due at once.

mod flow;
pub mod packet;

use std::net::{IpAddr, SocketAddr, UdpSocket as StdUdpSocket};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use serde::Serialize;
use tokio::net::{TcpStream, UdpSocket};

use crate::turn::{Conn, Failure, TurnClient};
use flow::{Keepalive, Plan, Shared};
use packet::{Framing, Tracker};

/// Most allocations one run makes.
pub const MAX_ALLOCATIONS: usize = 20_000;
/// Longest run, seconds.
pub const MAX_DURATION_SECS: f64 = 3600.0;
/// Most packets per second per allocation.
pub const MAX_RATE: f64 = 100_000.0;
/// Payload sizes: the load header at least; at most what fits a datagram with room to spare.
pub const MIN_SIZE: usize = packet::HEADER;
pub const MAX_SIZE: usize = 8192;
/// Longest refresh period: a permission lasts 300 s (RFC 8656 §9).
pub const MAX_REFRESH: Duration = Duration::from_secs(240);
/// The channel every allocation binds (channels are per allocation).
const CHANNEL: u16 = 0x4000;
/// Longest wait for echoes still in flight after the last send.
const DRAIN: Duration = Duration::from_secs(2);
/// Socket buffers of the generator's own UDP sockets.
const SOCKET_BUFFER: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
    /// Bare UDP without TURN, allocation `i` to the relay's port + `i`: for measuring a
    /// forwarder that does no TURN parsing.
    Raw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Each allocation sends to a UDP peer run by the generator, which echoes back.
    Peer,
    /// Allocations in pairs send to each other's relayed address; the receiver echoes.
    C2c,
}

/// A validated load run.
#[derive(Debug, Clone)]
pub struct Options {
    pub relay: SocketAddr,
    pub transport: Transport,
    /// TLS server name; the relay's IP when empty.
    pub tls_name: String,
    /// Accept any TLS certificate (self-signed test relays).
    pub insecure: bool,
    pub ca_file: Option<PathBuf>,
    pub username: String,
    pub password: String,
    pub allocations: usize,
    /// Packets per second per allocation (0: hold the allocations idle for the duration).
    pub rate: f64,
    pub size: usize,
    pub duration: Duration,
    pub mode: Mode,
    pub send_indications: bool,
    pub threads: usize,
    /// Where the generator's peers bind; the address the kernel uses towards the relay when
    /// unset.
    pub peer_ip: Option<IpAddr>,
    /// Where the allocations' client sockets bind over UDP (any address when unset): several
    /// generators on 127.0.0.2, 127.0.0.3... are several sources, each with its own ports.
    pub client_ip: Option<IpAddr>,
    /// Raw transport: the one peer's port (the forwarder sends there).
    pub peer_port: u16,
    /// Peer mode: a generator peer socket for each allocation instead of a few shared ones,
    /// so no two allocations send to the same peer address (a relay that multiplexes its
    /// relayed addresses on one port, as coturn's `--multiplex-peer` does, refuses a peer
    /// another allocation already has).
    pub peer_per_allocation: bool,
    /// Allocations being set up at once.
    pub setup_concurrency: usize,
    pub timeout: Duration,
    /// How often each allocation is refreshed and its channel or permission bound again
    /// (permissions last 300 s, so at most 240 s).
    pub refresh: Duration,
}

impl Options {
    /// Checks the bounds; the error names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if !(Duration::from_secs(1)..=MAX_REFRESH).contains(&self.refresh) {
            return Err(format!(
                "--refresh-secs: 1 to {} (permissions last 300 s)",
                MAX_REFRESH.as_secs()
            ));
        }
        if !(1..=MAX_ALLOCATIONS).contains(&self.allocations) {
            return Err(format!("--allocations: 1 to {MAX_ALLOCATIONS}"));
        }
        if self.mode == Mode::C2c && self.allocations % 2 != 0 {
            return Err(
                "--allocations: client-to-client pairs allocations, give an even number".into(),
            );
        }
        if self.mode == Mode::C2c && self.transport == Transport::Raw {
            return Err("--mode c2c needs TURN; raw sends to peers".into());
        }
        if self.peer_per_allocation && (self.mode != Mode::Peer || self.transport == Transport::Raw)
        {
            return Err("--peer-per-allocation: with --mode peer over TURN only".into());
        }
        if !(0.0..=MAX_RATE).contains(&self.rate) || !self.rate.is_finite() {
            return Err(format!(
                "--rate: 0 to {MAX_RATE} packets per second per allocation"
            ));
        }
        if !(MIN_SIZE..=MAX_SIZE).contains(&self.size) {
            return Err(format!("--size: {MIN_SIZE} to {MAX_SIZE} bytes"));
        }
        let secs = self.duration.as_secs_f64();
        if !(secs > 0.0 && secs <= MAX_DURATION_SECS) {
            return Err(format!(
                "--duration: more than 0, at most {MAX_DURATION_SECS} seconds"
            ));
        }
        if self.transport == Transport::Raw
            && usize::from(self.relay.port()) + self.allocations > 65_536
        {
            return Err("--relay: raw flows use consecutive ports from the relay's".into());
        }
        Ok(())
    }
}

/// The request of an allocation's setup that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Step {
    #[serde(rename = "TCP connect")]
    Connect,
    #[serde(rename = "TLS handshake")]
    Handshake,
    Allocate,
    ChannelBind,
    CreatePermission,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Connect => "TCP connect",
            Step::Handshake => "TLS handshake",
            Step::Allocate => "Allocate",
            Step::ChannelBind => "ChannelBind",
            Step::CreatePermission => "CreatePermission",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("allocation {index} of {total}: {step} failed: {failure}{}", hint.as_ref().map_or(String::new(), |h| format!(" ({h})")))]
    Allocation {
        index: usize,
        total: usize,
        step: Step,
        failure: Failure,
        /// What the failure most likely means, from what else happened in the run.
        hint: Option<String>,
    },
    #[error("{0}")]
    Setup(Failure),
}

impl LoadError {
    pub fn failure(&self) -> &Failure {
        match self {
            LoadError::Allocation { failure, .. } | LoadError::Setup(failure) => failure,
        }
    }
}

/// What a setup failure most likely means: `done` of the run's allocations got past `step`
/// (a limit, when some did; a policy or the credentials, when none did).
fn hint(opts: &Options, step: Step, failure: &Failure, done: usize) -> Option<String> {
    match (step, failure) {
        (
            Step::Connect | Step::Handshake | Step::Allocate,
            Failure::Reset(_) | Failure::Refused(_) | Failure::Tls(_),
        ) if done > 0 && matches!(opts.transport, Transport::Tcp | Transport::Tls) => {
            Some(format!(
                "{done} connections were accepted first: the relay limits the connections one \
                 address may hold (Turnpike: tcp.max_connections_per_ip, 64 by default); raise \
                 it for the test, or make fewer allocations"
            ))
        }
        (Step::Allocate, Failure::Status(401, _)) => Some(
            "the relay refused the credentials: check --user and --password, or --secret".into(),
        ),
        (Step::Allocate, Failure::Status(486, _)) => Some(format!(
            "the relay's allocation quota per user is reached after {done}: raise it for the \
             test (Turnpike: quota.user_allocations), or use --secret, whose credentials are \
             one user id each"
        )),
        (Step::Allocate, Failure::Status(508, _)) => Some(format!(
            "the relay is at its capacity or total quota after {done} allocations"
        )),
        (Step::ChannelBind | Step::CreatePermission, Failure::Status(403, _)) => {
            let shared_peers = opts.mode == Mode::Peer && !opts.peer_per_allocation;
            Some(if done > 0 && shared_peers {
                format!(
                    "{done} allocations bound the same peer first: a relay whose allocations \
                     share relay ports (Turnpike's shared_relay_ports, coturn's \
                     --multiplex-peer) gives a peer endpoint to one allocation only; \
                     --peer-per-allocation gives each allocation a peer of its own"
                )
            } else if opts.mode == Mode::Peer {
                "the relay's peer policy refuses the generator's peer address: allow it on \
                 the relay (--allow-peer), or choose it with --peer-ip"
                    .into()
            } else {
                "the relay's peer policy refuses its own relayed addresses as peers".into()
            })
        }
        _ => None,
    }
}

/// One run's results, as `--json` prints them.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub transport: Transport,
    pub mode: Mode,
    /// `channel`, `send-indication` or `raw`.
    pub framing: &'static str,
    pub allocations: usize,
    pub rate_per_allocation: f64,
    pub size: usize,
    pub setup: Setup,
    /// The generator's distinct peer addresses (peer mode; 0 client to client).
    pub peers: usize,
    /// Seconds of sending.
    pub duration_s: f64,
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub reordered: u64,
    pub duplicates: u64,
    pub throughput: Throughput,
    /// Datagrams the relay forwarded for the echoes received (a lower bound): two per echo
    /// with peers (there and back), four client to client.
    pub relayed: u64,
    pub rtt_ms: Option<Rtt>,
    /// Mean over flows of the RFC 3550 interarrival jitter of echoes, milliseconds.
    pub jitter_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    /// Allocate transactions (with authentication) completed, and how fast.
    pub allocations: usize,
    pub seconds: f64,
    pub per_second: f64,
    /// ChannelBind or CreatePermission for every allocation.
    pub bind_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub sent_pps: f64,
    pub received_pps: f64,
    /// Payload bits of echoes received per second.
    pub mbps: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Rtt {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// Runs the load on the current (multi-threaded) runtime. `bar` shows progress (hidden when
/// not on a terminal); `ready` is told once every allocation is set up, before traffic.
pub async fn run(
    opts: &Options,
    bar: &ProgressBar,
    ready: impl FnOnce(&Setup),
) -> Result<Report, LoadError> {
    let shared = Arc::new(Shared::new(opts.threads * 2));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let peers = start_peers(opts, &stop_rx).map_err(LoadError::Setup)?;

    bar.set_length(opts.allocations as u64);
    bar.set_message("allocating");
    let t0 = Instant::now();
    let conns = allocate_all(opts, bar).await?;
    let alloc_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let bound = bind_all(opts, conns, &peers).await?;
    let setup = Setup {
        allocations: if opts.transport == Transport::Raw {
            0
        } else {
            opts.allocations
        },
        seconds: alloc_secs,
        per_second: opts.allocations as f64 / alloc_secs.max(1e-9),
        bind_seconds: t1.elapsed().as_secs_f64(),
    };
    ready(&setup);

    let start = Instant::now() + Duration::from_millis(50);
    let until = start + opts.duration;
    let period = if opts.rate > 0.0 {
        Duration::from_secs_f64(1.0 / opts.rate)
    } else {
        Duration::ZERO
    };
    let mut tasks = Vec::with_capacity(bound.len());
    for (i, (conn, leftover, framing, keepalive)) in bound.into_iter().enumerate() {
        let plan = Plan {
            index: i as u32,
            framing,
            size: opts.size,
            rate: opts.rate,
            // Spread the flows' sends over one period instead of all at once.
            start: start + period.mul_f64(i as f64 / opts.allocations as f64),
            until,
            keepalive,
            refresh: opts.refresh,
        };
        let shared = Arc::clone(&shared);
        let stop = stop_rx.clone();
        tasks.push(match conn {
            Conn::Udp(sock) => tokio::spawn(flow::run_udp(plan, sock, shared, stop)),
            Conn::Stream(s) => tokio::spawn(flow::run_stream(plan, s, leftover, shared, stop)),
        });
    }

    bar.set_position(0);
    bar.set_length(opts.duration.as_millis() as u64);
    let progress = |bar: &ProgressBar| {
        bar.set_message(format!(
            "sent {} received {}",
            shared.sent.load(Ordering::Relaxed),
            shared.received.load(Ordering::Relaxed)
        ));
    };
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100).min(until - Instant::now())).await;
        bar.set_position(start.elapsed().as_millis() as u64);
        progress(bar);
    }
    // Echoes still on their way: wait until they are in, or DRAIN has passed.
    let drain_end = Instant::now() + DRAIN;
    while Instant::now() < drain_end
        && shared.received.load(Ordering::Relaxed) < shared.sent.load(Ordering::Relaxed)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sent_secs = if opts.rate > 0.0 {
        opts.duration.as_secs_f64()
    } else {
        0.0
    };
    progress(bar);
    let _ = stop_tx.send(true);
    let mut flows = Vec::with_capacity(tasks.len());
    for t in tasks {
        if let Ok(Ok(tracker)) = tokio::time::timeout(Duration::from_secs(5), t).await {
            flows.push(tracker);
        }
    }
    bar.finish_and_clear();
    Ok(report(opts, setup, peers.len(), sent_secs, &flows, &shared))
}

fn report(
    opts: &Options,
    setup: Setup,
    peers: usize,
    secs: f64,
    flows: &[Tracker],
    shared: &Shared,
) -> Report {
    let sum = |f: fn(&Tracker) -> u64| flows.iter().map(f).sum::<u64>();
    let (sent, received) = (sum(|t| t.sent), sum(|t| t.received));
    let jitters: Vec<f64> = flows
        .iter()
        .filter(|t| t.received > 1)
        .map(|t| t.jitter_ns)
        .collect();
    let mut merged: Option<hdrhistogram::Histogram<u64>> = None;
    for h in &shared.histograms {
        let Ok(h) = h.lock() else { continue };
        match merged.as_mut() {
            None => merged = Some(h.clone()),
            Some(m) => {
                let _ = m.add(&*h);
            }
        }
    }
    let ms = |us: u64| us as f64 / 1000.0;
    let rtt = merged.filter(|h| !h.is_empty()).map(|h| Rtt {
        p50: ms(h.value_at_quantile(0.50)),
        p90: ms(h.value_at_quantile(0.90)),
        p99: ms(h.value_at_quantile(0.99)),
        max: ms(h.max()),
        mean: h.mean() / 1000.0,
    });
    let per_echo = match opts.mode {
        Mode::Peer => 2,
        Mode::C2c => 4,
    };
    let rate = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    Report {
        transport: opts.transport,
        mode: opts.mode,
        framing: match (opts.transport, opts.send_indications) {
            (Transport::Raw, _) => "raw",
            (_, true) => "send-indication",
            (_, false) => "channel",
        },
        allocations: opts.allocations,
        rate_per_allocation: opts.rate,
        size: opts.size,
        setup,
        peers,
        duration_s: secs,
        sent,
        received,
        lost: sent.saturating_sub(received),
        reordered: sum(|t| t.reordered),
        duplicates: sum(|t| t.duplicates),
        throughput: Throughput {
            sent_pps: rate(sent),
            received_pps: rate(received),
            mbps: rate(received) * (opts.size * 8) as f64 / 1e6,
        },
        relayed: received * per_echo,
        rtt_ms: rtt,
        jitter_ms: if jitters.is_empty() {
            0.0
        } else {
            jitters.iter().sum::<f64>() / jitters.len() as f64 / 1e6
        },
    }
}

/// A packet rate as people read it: `50 pkt/s`, `363.4 pkt/s`, `0.5 pkt/s`.
fn rate(pps: f64) -> String {
    if pps == pps.round() {
        format!("{pps:.0} pkt/s")
    } else {
        format!("{pps:.1} pkt/s")
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
            Transport::Raw => "raw UDP (no TURN)",
        })
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Peer => "to the generator's peers",
            Mode::C2c => "client to client",
        })
    }
}

/// The report as a table for people.
pub fn table(r: &Report) -> String {
    let mut s = String::new();
    let line = |s: &mut String, k: &str, v: String| s.push_str(&format!("{k:<22} {v}\n"));
    line(
        &mut s,
        "load",
        format!(
            "{} allocations over {}, {}, {}, {} each, {} bytes",
            r.allocations,
            r.transport,
            r.mode,
            r.framing,
            rate(r.rate_per_allocation),
            r.size
        ),
    );
    line(
        &mut s,
        "allocations",
        format!(
            "{} in {:.3} s ({:.0}/s), bound in {:.3} s",
            r.setup.allocations, r.setup.seconds, r.setup.per_second, r.setup.bind_seconds
        ),
    );
    line(&mut s, "sent", r.sent.to_string());
    line(&mut s, "received", r.received.to_string());
    let pct = if r.sent > 0 {
        100.0 * r.lost as f64 / r.sent as f64
    } else {
        0.0
    };
    line(&mut s, "lost", format!("{} ({pct:.3}%)", r.lost));
    line(&mut s, "reordered", r.reordered.to_string());
    line(&mut s, "duplicates", r.duplicates.to_string());
    line(
        &mut s,
        "throughput",
        format!(
            "{:.0} pkt/s sent, {:.0} pkt/s received, {:.2} Mbit/s",
            r.throughput.sent_pps, r.throughput.received_pps, r.throughput.mbps
        ),
    );
    match &r.rtt_ms {
        Some(t) => line(
            &mut s,
            "rtt ms",
            format!(
                "p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}  mean {:.3}",
                t.p50, t.p90, t.p99, t.max, t.mean
            ),
        ),
        None => line(&mut s, "rtt ms", "no echoes".into()),
    }
    line(&mut s, "jitter ms", format!("{:.3}", r.jitter_ms));
    s
}

/// The generator's UDP peers: enough sockets to spread the echo work over the threads, or one
/// per allocation with `peer_per_allocation`.
fn start_peers(
    opts: &Options,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<SocketAddr>, Failure> {
    if opts.mode != Mode::Peer {
        return Ok(Vec::new());
    }
    let ip = match opts.peer_ip {
        Some(ip) => ip,
        None => route_ip(opts.relay)?,
    };
    let (count, port) = if opts.transport == Transport::Raw {
        (1, opts.peer_port)
    } else if opts.peer_per_allocation {
        (opts.allocations, 0)
    } else {
        (opts.allocations.min((opts.threads * 2).max(2)), 0)
    };
    let mut addrs = Vec::with_capacity(count);
    for _ in 0..count {
        let sock = udp_socket(SocketAddr::new(ip, port)).map_err(|e| Failure::io("peer", e))?;
        addrs.push(sock.local_addr().map_err(|e| Failure::io("peer", e))?);
        tokio::spawn(flow::run_peer(sock, opts.size + 128, stop.clone()));
    }
    Ok(addrs)
}

/// The local address the kernel would use to reach `to`.
fn route_ip(to: SocketAddr) -> Result<IpAddr, Failure> {
    let any: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .map_err(|_| Failure::Other("address".into()))?;
    let s = StdUdpSocket::bind(any).map_err(|e| Failure::io("bind", e))?;
    s.connect(to).map_err(|e| Failure::io("route", e))?;
    Ok(s.local_addr().map_err(|e| Failure::io("route", e))?.ip())
}

fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    UdpSocket::from_std(sock.into())
}

/// A connection to the relay; an error names the step that failed.
async fn connect(
    opts: &Options,
    to: SocketAddr,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> Result<Conn, (Step, Failure)> {
    let at = |step| move |f| (step, f);
    match opts.transport {
        Transport::Udp | Transport::Raw => {
            let ip = opts.client_ip.unwrap_or(if to.is_ipv4() {
                IpAddr::from([0u8; 4])
            } else {
                IpAddr::from([0u16; 8])
            });
            let any = SocketAddr::new(ip, 0);
            let s = udp_socket(any)
                .map_err(|e| Failure::io("bind", e))
                .map_err(at(Step::Connect))?;
            s.connect(to)
                .await
                .map_err(|e| Failure::io("connect", e))
                .map_err(at(Step::Connect))?;
            Ok(Conn::Udp(s))
        }
        Transport::Tcp | Transport::Tls => {
            let tcp = tokio::time::timeout(opts.timeout, TcpStream::connect(to))
                .await
                .map_err(|_| Failure::Timeout(format!("TCP connect to {to}")))
                .and_then(|r| r.map_err(|e| Failure::io(&format!("TCP connect to {to}"), e)))
                .map_err(at(Step::Connect))?;
            let _ = tcp.set_nodelay(true);
            let Some(tls) = tls else {
                return Ok(Conn::Stream(Box::new(tcp)));
            };
            let name = if opts.tls_name.is_empty() {
                to.ip().to_string()
            } else {
                opts.tls_name.clone()
            };
            let name = rustls::pki_types::ServerName::try_from(name)
                .map_err(|e| Failure::Tls(e.to_string()))
                .map_err(at(Step::Handshake))?;
            let s = tokio::time::timeout(opts.timeout, tls.connect(name, tcp))
                .await
                .map_err(|_| Failure::Timeout("TLS handshake".into()))
                .and_then(|r| {
                    r.map_err(|e| match e.kind() {
                        std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::UnexpectedEof => {
                            Failure::Reset(format!("TLS handshake: {e}"))
                        }
                        _ => Failure::Tls(e.to_string()),
                    })
                })
                .map_err(at(Step::Handshake))?;
            Ok(Conn::Stream(Box::new(s)))
        }
    }
}

/// A connection per allocation and its Allocate, `setup_concurrency` at a time.
async fn allocate_all(
    opts: &Options,
    bar: &ProgressBar,
) -> Result<Vec<(TurnClient, SocketAddr)>, LoadError> {
    let tls = match opts.transport {
        Transport::Tls => Some(tls_connector(opts).map_err(LoadError::Setup)?),
        Transport::Udp | Transport::Tcp | Transport::Raw => None,
    };
    let limit = Arc::new(tokio::sync::Semaphore::new(opts.setup_concurrency.max(1)));
    // The realm and nonce the first allocations learn, for the others to sign with at once.
    let learnt: Arc<std::sync::Mutex<Option<Learnt>>> = Arc::default();
    let mut tasks = Vec::with_capacity(opts.allocations);
    for i in 0..opts.allocations {
        let (opts, tls, limit, bar) = (opts.clone(), tls.clone(), Arc::clone(&limit), bar.clone());
        let learnt = Arc::clone(&learnt);
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire_owned().await;
            let raw = opts.transport == Transport::Raw;
            let to = if raw {
                SocketAddr::new(opts.relay.ip(), opts.relay.port() + i as u16)
            } else {
                opts.relay
            };
            // 437: the relay still holds an allocation for this 5-tuple (one an earlier run
            // left behind); like any client, try again from another local port.
            let mut attempts = 0;
            loop {
                let conn = connect(&opts, to, tls.as_ref()).await?;
                let allocate = |f| (Step::Allocate, f);
                let known = learnt.lock().ok().and_then(|l| l.clone());
                let mut client =
                    TurnClient::new(conn, &opts.username, &opts.password).with_nonce(known);
                let relayed = if raw {
                    to
                } else {
                    match client.allocate(opts.timeout).await {
                        Ok((relayed, _)) => {
                            if let Ok(mut l) = learnt.lock() {
                                *l = client.nonce();
                            }
                            relayed
                        }
                        Err(Failure::Status(437, _)) if attempts < 3 => {
                            attempts += 1;
                            continue;
                        }
                        Err(e) => return Err(allocate(e)),
                    }
                };
                bar.inc(1);
                return Ok::<_, (Step, Failure)>((client, relayed));
            }
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    let mut first_error = None;
    for (index, t) in tasks.into_iter().enumerate() {
        match t.await {
            Ok(Ok(c)) => out.push(c),
            Ok(Err((step, failure))) => {
                first_error.get_or_insert((index, step, failure));
            }
            Err(e) => {
                first_error.get_or_insert((0, Step::Connect, Failure::Other(e.to_string())));
            }
        }
    }
    let Some((index, step, failure)) = first_error else {
        return Ok(out);
    };
    let e = LoadError::Allocation {
        index,
        total: opts.allocations,
        step,
        hint: hint(opts, step, &failure, out.len()),
        failure,
    };
    // Give back what was allocated, so a failed run leaves nothing held on the relay.
    let releases = out.into_iter().map(|(mut client, _)| async move {
        client.release().await;
    });
    let _ = tokio::time::timeout(
        Duration::from_secs(3),
        futures_util::future::join_all(releases),
    )
    .await;
    Err(e)
}

type Bound = (Conn, Vec<u8>, Framing, Option<Keepalive>);

/// A realm and the nonce the relay gave for this address.
type Learnt = (String, Vec<u8>);

/// ChannelBind (or CreatePermission for Send indications) from every allocation to its
/// target: a generator peer, or the other allocation of its pair.
async fn bind_all(
    opts: &Options,
    conns: Vec<(TurnClient, SocketAddr)>,
    peers: &[SocketAddr],
) -> Result<Vec<Bound>, LoadError> {
    let relayed: Vec<SocketAddr> = conns.iter().map(|(_, r)| *r).collect();
    let limit = Arc::new(tokio::sync::Semaphore::new(opts.setup_concurrency.max(1)));
    let stream = matches!(opts.transport, Transport::Tcp | Transport::Tls);
    let mut tasks = Vec::with_capacity(conns.len());
    for (i, (mut client, _)) in conns.into_iter().enumerate() {
        let target = match opts.mode {
            Mode::Peer => peers[i % peers.len().max(1)],
            Mode::C2c => relayed[i ^ 1],
        };
        let (opts, limit) = (opts.clone(), Arc::clone(&limit));
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire_owned().await;
            if opts.transport == Transport::Raw {
                let (conn, _, rest) = client.into_parts();
                return Ok::<Bound, (Step, Failure)>((conn, rest, Framing::Raw, None));
            }
            let (framing, channel) = if opts.send_indications {
                client
                    .permit(target, opts.timeout)
                    .await
                    .map_err(|f| (Step::CreatePermission, f))?;
                (Framing::send_indication(target, opts.size), None)
            } else {
                client
                    .channel_bind(CHANNEL, target, opts.timeout)
                    .await
                    .map_err(|f| (Step::ChannelBind, f))?;
                (
                    Framing::Channel {
                        number: CHANNEL,
                        pad: stream,
                    },
                    Some(CHANNEL),
                )
            };
            let (conn, creds, rest) = client.into_parts();
            let keepalive = Keepalive {
                creds,
                target,
                channel,
            };
            Ok((conn, rest, framing, Some(keepalive)))
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    let mut first_error = None;
    for (index, t) in tasks.into_iter().enumerate() {
        match t.await {
            Ok(Ok(b)) => out.push(b),
            Ok(Err((step, failure))) => {
                first_error.get_or_insert((index, step, failure));
            }
            Err(e) => return Err(LoadError::Setup(Failure::Other(e.to_string()))),
        }
    }
    match first_error {
        None => Ok(out),
        Some((index, step, failure)) => Err(LoadError::Allocation {
            index,
            total: opts.allocations,
            step,
            hint: hint(opts, step, &failure, out.len()),
            failure,
        }),
    }
}

fn tls_connector(opts: &Options) -> Result<tokio_rustls::TlsConnector, Failure> {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| Failure::Tls(e.to_string()))?;
    let mut config = if opts.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &opts.ca_file {
            Some(path) => {
                let bad = |e: &dyn std::fmt::Display| {
                    Failure::Tls(format!("--ca-file {}: {e}", path.display()))
                };
                for cert in
                    rustls::pki_types::CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))?
                {
                    roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![b"stun.turn".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// `--insecure`: any certificate is accepted, and handshake signatures are not checked either
/// (an unverified certificate proves nothing, so its signature would not). The generator
/// shares the machine with the relay it measures: skipping the ECDSA P-256 verification took
/// its CPU per TLS allocation from 0.34-0.40 ms to 0.30-0.34 ms here.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

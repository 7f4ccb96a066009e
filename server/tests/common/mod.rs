//! Test harness: starts the real `turnpike` binary on ephemeral loopback ports, learns the bound
//! ports from its start-up log, and talks to it as clients do.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use turnpike_proto::stun::{attr, method, Builder, Class, Message, TransactionId, MAGIC_COOKIE};

pub mod fleet;

pub const REALM: &str = "turnpike.test";

/// The relay binary: Cargo's own path in the relay's tests; in other packages' tests (the
/// probe's), the workspace build, which `cargo test --workspace` has made.
pub fn relay_binary() -> std::path::PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_turnpike") {
        return p.into();
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target").into());
    let path = std::path::PathBuf::from(target)
        .join("debug")
        .join("turnpike");
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "turnpike", "--bin", "turnpike"])
            .status()
            .expect("cargo build");
        assert!(status.success(), "could not build the relay");
    }
    path
}

/// The probe binary, from the workspace build (`cargo test --workspace` makes it).
pub fn probe_binary() -> std::path::PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../target").into());
    let path = std::path::PathBuf::from(target)
        .join("debug")
        .join("turnpike-probe");
    if !path.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "turnpike-probe", "--bin", "turnpike-probe"])
            .status()
            .expect("cargo build");
        assert!(status.success(), "could not build the probe");
    }
    path
}

/// A running relay; killed when dropped.
pub struct Relay {
    child: Option<Child>,
    pub udp: SocketAddr,
    pub metrics: SocketAddr,
    log: Arc<(Mutex<Vec<String>>, Condvar)>,
}

impl Relay {
    /// Starts the relay on loopback with `extra` flags added to the harness's own.
    pub fn start(extra: &[&str]) -> Relay {
        Self::start_logging("info", extra)
    }

    /// Starts the relay with TCP and TLS listeners besides UDP, loopback peers allowed and
    /// the static user alice:wonderland, plus `extra` flags.
    pub fn with_streams(cert: &TestCert, extra: &[&str]) -> Relay {
        let mut args = vec![
            "--listen",
            "tcp://127.0.0.1:0",
            "--listen",
            "tls://127.0.0.1:0",
            "--cert",
            cert.cert.to_str().expect("path"),
            "--key",
            cert.key.to_str().expect("path"),
            "--allow-peer",
            "127.0.0.0/8",
            "--user",
            "alice:wonderland",
        ];
        args.extend_from_slice(extra);
        Self::start(&args)
    }

    pub fn spawn(args: &[&str]) -> Relay {
        Self::spawn_via(&[], args)
    }

    /// Starts the relay through `wrapper` (a command that runs the rest of its arguments in
    /// its own place, such as `prlimit --nofile=64:64 --`).
    pub fn spawn_via(wrapper: &[&str], args: &[&str]) -> Relay {
        Self::spawn_logging(wrapper, args, "info")
    }

    /// `start` with the relay's log at `level` (`TURNPIKE_LOG`), e.g. `debug` to see each
    /// allocation's relayed addresses. Two threads unless `extra` says `--threads`.
    pub fn start_logging(level: &str, extra: &[&str]) -> Relay {
        let threads = if extra.contains(&"--threads") {
            &[][..]
        } else {
            &["--threads", "2"][..]
        };
        let mut args = vec![
            "--listen",
            "udp://127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--relay-ip",
            "127.0.0.1",
            "--realm",
            REALM,
            "--drain-grace",
            "5",
        ];
        args.extend_from_slice(threads);
        args.extend_from_slice(extra);
        Self::spawn_logging(&[], &args, level)
    }

    fn spawn_logging(wrapper: &[&str], args: &[&str], level: &str) -> Relay {
        let binary = relay_binary();
        let mut command = match wrapper.split_first() {
            None => Command::new(&binary),
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(&binary);
                c
            }
        };
        let mut child = command
            .args(args)
            .env("TURNPIKE_LOG", level)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start turnpike");
        let log = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        for stream in [
            Box::new(child.stderr.take().expect("stderr")) as Box<dyn Read + Send>,
            Box::new(child.stdout.take().expect("stdout")),
        ] {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let (lines, cv) = &*log;
                    lines.lock().expect("log").push(line);
                    cv.notify_all();
                }
            });
        }
        let mut relay = Relay {
            child: Some(child),
            udp: "0.0.0.0:0".parse().expect("addr"),
            metrics: "0.0.0.0:0".parse().expect("addr"),
            log,
        };
        // Every listener is logged before the relay addresses.
        relay.wait_for_log("relaying IPv");
        if relay.log_text().contains("listening on udp://") {
            relay.udp = relay.addr_of("udp");
        }
        if args.contains(&"--metrics-listen") {
            let line = relay.wait_for_log("metrics on http://");
            let addr = line.rsplit("http://").next().expect("addr");
            relay.metrics = addr
                .trim_end_matches("/metrics")
                .trim()
                .parse()
                .expect("metrics addr");
        }
        relay
    }

    /// Waits (up to 20 s) for a log line containing `needle` and returns it.
    pub fn wait_for_log(&self, needle: &str) -> String {
        let (lines, cv) = &*self.log;
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut guard = lines.lock().expect("log");
        loop {
            if let Some(l) = guard.iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no log line with {needle:?}; log:\n{}",
                guard.join("\n")
            );
            guard = cv.wait_timeout(guard, left).expect("log").0;
        }
    }

    /// The bound address of the first listener with this scheme (`tcp`, `tls`).
    pub fn addr_of(&self, scheme: &str) -> SocketAddr {
        let needle = format!("listening on {scheme}://");
        let line = self.wait_for_log(&needle);
        let rest = line.split(&needle).nth(1).expect("addr");
        rest.split_whitespace()
            .next()
            .expect("addr")
            .parse()
            .expect("socket address")
    }

    pub fn log_text(&self) -> String {
        self.log.0.lock().expect("log").join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("child").id()
    }

    /// Waits for the process to exit by itself (up to `secs`); returns its status.
    pub fn wait_exit(&mut self, secs: u64) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let child = self.child.as_mut().expect("child");
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "relay did not exit in {secs} s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    pub fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.metrics, path)
    }

    /// The sum of the series `name{labels}` selects: every line of that metric whose labels
    /// include the given ones (so `x{direction="a"}` adds up all tenants); 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        let (_, body) = self.http_get("/metrics");
        sum_series(&body, series)
    }

    /// Polls `/metrics` until `series` reaches `at_least` (up to 10 s); returns the value.
    pub fn wait_metric(&self, series: &str, at_least: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self.metric(series);
            if v >= at_least || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid() as i32, sig);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // A failing test shows what the relay said.
        if std::thread::panicking() {
            eprintln!(
                "--- log of the relay at {} ---\n{}",
                self.udp,
                self.log_text()
            );
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `name{a="x",b="y"}` → the name and its label pairs.
fn split_series(s: &str) -> (&str, Vec<&str>) {
    match s.split_once('{') {
        None => (s, Vec::new()),
        Some((name, rest)) => (
            name,
            rest.trim_end_matches('}')
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .collect(),
        ),
    }
}

/// Adds up the exposition lines of `series`' metric that carry all its labels.
pub fn sum_series(exposition: &str, series: &str) -> f64 {
    let (name, want) = split_series(series);
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(s, _)| {
            let (n, labels) = split_series(s);
            n == name && want.iter().all(|w| labels.contains(w))
        })
        .map(|(_, v)| v.trim().parse::<f64>().expect("number"))
        .sum()
}

/// A minimal HTTP/1.0 GET for the metrics endpoint.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Waits (at most 10 s) until a UDP echo server such as `turnutils_peer` answers on `addr`,
/// so a load started next loses nothing to a peer that is not listening yet.
pub fn wait_udp_echo(addr: SocketAddr) {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    for _ in 0..100 {
        let _ = sock.send_to(b"ready?", addr);
        if matches!(sock.recv_from(&mut buf), Ok((_, from)) if from == addr) {
            return;
        }
    }
    panic!("nothing echoes on udp {addr}");
}

/// Runs a command to completion (bounded by `timeout` seconds) and returns stdout+stderr.
pub fn run_tool(program: &str, args: &[&str], timeout: u64) -> String {
    let out = Command::new("timeout")
        .arg(timeout.to_string())
        .arg(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} could not run ({e}); .ci/run installs it"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    text
}

/// A STUN/TURN client built on the codec, for exact checks of response codes.
pub struct RawClient {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    pub username: String,
    pub password: String,
    pub nonce: Vec<u8>,
    /// The realm to sign with: learned from the relay's 401, as real clients do.
    pub realm: String,
    /// An ORIGIN attribute sent with every request (it selects a tenant).
    pub origin: Option<String>,
    next: u32,
}

pub struct Response {
    pub raw: Vec<u8>,
}

impl Response {
    pub fn msg(&self) -> Message<'_> {
        Message::parse(&self.raw).expect("response parses")
    }
    /// None for success, else the error code.
    pub fn code(&self) -> Option<u16> {
        let m = self.msg();
        if m.class() == Class::Success {
            return None;
        }
        let v = m.get(attr::ERROR_CODE).expect("ERROR-CODE");
        Some(u16::from(v[2] & 7) * 100 + u16::from(v[3]))
    }
    pub fn xor_addrs(&self, ty: u16) -> Vec<SocketAddr> {
        let m = self.msg();
        m.get_all(ty).filter_map(|v| m.xor_address(v)).collect()
    }
}

impl RawClient {
    pub fn new(server: SocketAddr, username: &str, password: &str) -> Self {
        Self::from_ip("127.0.0.1", server, username, password)
    }

    /// A client on another loopback address (`127.0.0.2`...), so another source to the relay.
    pub fn from_ip(ip: &str, server: SocketAddr, username: &str, password: &str) -> Self {
        let sock = UdpSocket::bind((ip, 0)).expect("bind");
        sock.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        RawClient {
            sock,
            server,
            username: username.to_owned(),
            password: password.to_owned(),
            nonce: Vec::new(),
            realm: REALM.to_owned(),
            origin: None,
            next: 0,
        }
    }

    pub fn tid(&mut self) -> TransactionId {
        self.next += 1;
        let mut t = [0u8; 16];
        t[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        t[4..8].copy_from_slice(&self.next.to_be_bytes());
        t[8..12].copy_from_slice(&std::process::id().to_be_bytes());
        TransactionId(t)
    }

    /// Sends a datagram and waits for the response with the same transaction id.
    pub fn exchange(&self, packet: &[u8]) -> Response {
        let want = &packet[4..20];
        for _attempt in 0..3 {
            self.sock.send_to(packet, self.server).expect("send");
            let mut buf = [0u8; 2048];
            let deadline = Instant::now() + Duration::from_secs(2);
            while Instant::now() < deadline {
                let Ok((n, _)) = self.sock.recv_from(&mut buf) else {
                    break;
                };
                if n >= 20 && &buf[4..20] == want {
                    return Response {
                        raw: buf[..n].to_vec(),
                    };
                }
            }
        }
        panic!("no response from the relay");
    }

    /// Builds a request, signed with the long-term key once a nonce is known.
    pub fn build(&mut self, m: u16, extra: impl Fn(&mut Builder<'_>)) -> Vec<u8> {
        let tid = self.tid();
        let mut buf = Vec::new();
        let mut b = Builder::new(&mut buf, Class::Request, m, tid);
        extra(&mut b);
        if let Some(o) = &self.origin {
            b.attr(attr::ORIGIN, o.as_bytes());
        }
        if !self.nonce.is_empty() {
            let key =
                turnpike_proto::auth::long_term_key(&self.username, &self.realm, &self.password);
            b.attr(attr::USERNAME, self.username.as_bytes())
                .attr(attr::REALM, self.realm.as_bytes())
                .attr(attr::NONCE, &self.nonce)
                .integrity_sha1(&key);
        }
        b.fingerprint();
        buf
    }

    /// Takes the nonce from the first 401 or any 438; true means: send the request again.
    pub fn learn(&mut self, r: &Response) -> bool {
        match r.code() {
            Some(401) if self.nonce.is_empty() => {}
            Some(438) => {}
            _ => return false,
        }
        self.nonce = r.msg().get(attr::NONCE).expect("nonce").to_vec();
        if let Some(realm) = r.msg().get(attr::REALM) {
            self.realm = String::from_utf8_lossy(realm).into_owned();
        }
        true
    }

    /// A request signed with the long-term key; learns the nonce from a 401/438 and retries.
    pub fn request(&mut self, m: u16, extra: impl Fn(&mut Builder<'_>)) -> Response {
        for _ in 0..3 {
            let packet = self.build(m, &extra);
            let r = self.exchange(&packet);
            if !self.learn(&r) {
                return r;
            }
        }
        panic!("could not authenticate");
    }

    /// The same over a stream (TCP or TLS): STUN framing, ChannelData frames skipped.
    pub async fn request_on<S>(
        &mut self,
        s: &mut S,
        m: u16,
        extra: impl Fn(&mut Builder<'_>),
    ) -> Response
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        for _ in 0..3 {
            let packet = self.build(m, &extra);
            let r = stream_exchange(s, &packet).await;
            if !self.learn(&r) {
                return r;
            }
        }
        panic!("could not authenticate");
    }

    pub fn allocate(&mut self) -> Response {
        self.request(method::ALLOCATE, |b| {
            b.u32(attr::REQUESTED_TRANSPORT, 17 << 24);
        })
    }
}

/// Reads the next frame of a TURN stream (a STUN message, or ChannelData without its padding),
/// waiting at most `secs`; None when the stream ends or nothing comes.
pub async fn read_frame<S>(s: &mut S, secs: u64) -> Option<Vec<u8>>
where
    S: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let read = async {
        let mut head = [0u8; 4];
        s.read_exact(&mut head).await.ok()?;
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let body_len = if head[0] & 0xC0 == 0x40 {
            (len + 3) & !3
        } else {
            16 + len
        };
        let mut body = vec![0u8; body_len];
        s.read_exact(&mut body).await.ok()?;
        let mut frame = head.to_vec();
        frame.extend_from_slice(&body);
        Some(frame)
    };
    tokio::time::timeout(Duration::from_secs(secs), read)
        .await
        .ok()
        .flatten()
}

/// Whether the other end closes `s` (end of stream or reset) within `secs`, reading and
/// dropping whatever comes before.
pub async fn closes_within<S>(s: &mut S, secs: u64) -> bool
where
    S: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(secs), read)
        .await
        .is_ok()
}

/// A configuration file in a fresh folder, removed when dropped.
pub struct ConfigFile {
    pub dir: std::path::PathBuf,
    pub path: std::path::PathBuf,
}

impl ConfigFile {
    pub fn new(name: &str, text: &str) -> ConfigFile {
        let dir = std::env::temp_dir().join(format!(
            "turnpike-{name}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).expect("config dir");
        let path = dir.join("relay.toml");
        std::fs::write(&path, text).expect("write config");
        ConfigFile { dir, path }
    }

    pub fn arg(&self) -> &str {
        self.path.to_str().expect("path")
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Writes a STUN request on a stream and reads frames until its response (bounded to 5 s).
pub async fn stream_exchange<S>(s: &mut S, packet: &[u8]) -> Response
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(packet).await.expect("write");
    let read = async {
        loop {
            let mut head = [0u8; 4];
            s.read_exact(&mut head).await.expect("frame header");
            let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
            let body_len = if head[0] & 0xC0 == 0x40 {
                (len + 3) & !3
            } else {
                16 + len
            };
            let mut body = vec![0u8; body_len];
            s.read_exact(&mut body).await.expect("frame body");
            if head[0] & 0xC0 == 0 && body[..16] == packet[4..20] {
                let mut raw = head.to_vec();
                raw.extend_from_slice(&body);
                return Response { raw };
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("response on the stream")
}

/// A self-signed certificate for `turn.test` and 127.0.0.1, written to a fresh folder.
pub struct TestCert {
    pub dir: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub der: Vec<u8>,
}

impl TestCert {
    pub fn new(name: &str, names: &[&str]) -> TestCert {
        let dir = std::env::temp_dir().join(format!(
            "turnpike-{name}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).expect("cert dir");
        let ck = rcgen::generate_simple_self_signed(
            names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        )
        .expect("certificate");
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, ck.cert.pem()).expect("write cert");
        std::fs::write(&key, ck.key_pair.serialize_pem()).expect("write key");
        TestCert {
            dir,
            cert,
            key,
            der: ck.cert.der().to_vec(),
        }
    }

    /// A TLS client that trusts only this certificate, offering `alpn`.
    pub fn connector(&self, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(self.der.clone()))
            .expect("root");
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
    }
}

impl Drop for TestCert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A port that was free a moment ago, for tools that cannot bind port 0 themselves.
pub fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// `len` consecutive ports below the kernel's ephemeral range that nothing holds now (UDP and
/// TCP on 127.0.0.1), and that no other test of this process was given: for a relay's
/// `relay_ports` when a test counts on owning the whole range. Another process may still take
/// one later; the tests that use this hold their ranges for a few seconds.
#[allow(dead_code)]
pub fn free_port_range(len: u16) -> std::ops::RangeInclusive<u16> {
    static GIVEN: Mutex<Vec<(u16, u16)>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral.saturating_sub(len).max(10_001));
    for _ in 0..1000 {
        let start = low + (rand::random::<u16>() % (high - low));
        let end = start + len - 1;
        if given.iter().any(|&(a, b)| start <= b && a <= end) {
            continue;
        }
        let free = (start..=end).all(|p| {
            UdpSocket::bind(("127.0.0.1", p)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()
        });
        if free {
            given.push((start, end));
            return start..=end;
        }
    }
    panic!("no {len} free consecutive ports below {ephemeral}");
}

/// coturn's `turnutils_peer` echoing UDP on 127.0.0.1, answering: the process (killed when
/// dropped) and its port.
#[allow(dead_code)]
pub fn turnutils_peer() -> (Child2, u16) {
    let port = free_port();
    let child = Child2(
        Command::new("turnutils_peer")
            .args(["-L", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("turnutils_peer (.ci/run installs coturn)"),
    );
    wait_udp_echo(SocketAddr::from(([127, 0, 0, 1], port)));
    (child, port)
}

/// A child process killed when dropped.
pub struct Child2(pub Child);

impl Drop for Child2 {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `Total lost packets N` figure of a `turnutils_uclient` run (it exits 0 even when
/// packets are lost).
pub fn lost_packets(output: &str) -> u64 {
    let line = output
        .lines()
        .find(|l| l.contains("Total lost packets"))
        .unwrap_or_else(|| panic!("no loss report in turnutils_uclient output:\n{output}"));
    line.split("Total lost packets")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("lost count")
}

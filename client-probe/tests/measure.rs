//! `turnpike-probe` against real relays on loopback, behind delaying UDP and TCP proxies
//! written for these tests, and through a real HTTP CONNECT proxy (tinyproxy).

#[path = "../../server/tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_port, Child2, Relay, TestCert};

/// The delays a proxy actually applied, in milliseconds: a sleeping thread wakes late on a
/// busy machine, so the tests compare with what was injected rather than what was asked for.
#[derive(Clone, Default)]
struct Applied(Arc<Mutex<Vec<f64>>>);

impl Applied {
    fn record(&self, held: Duration) {
        self.0.lock().expect("lock").push(held.as_secs_f64() * 1e3);
    }

    /// The delays applied since the last call, and forgets them.
    fn take(&self) -> Held {
        let mut v = std::mem::take(&mut *self.0.lock().expect("lock"));
        assert!(!v.is_empty(), "the proxy relayed nothing");
        v.sort_by(f64::total_cmp);
        Held {
            least: v[0],
            median: v[v.len() / 2],
        }
    }
}

/// What one proxy applied during a round, in milliseconds.
struct Held {
    least: f64,
    median: f64,
}

/// Holds each item until its time comes and hands it on, recording the delay applied.
fn delay_line<T: Send + 'static>(
    rx: mpsc::Receiver<(Instant, Instant, T)>,
    applied: Applied,
    mut send: impl FnMut(T) -> bool + Send + 'static,
) {
    std::thread::spawn(move || {
        for (received, at, item) in rx {
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            applied.record(received.elapsed());
            if !send(item) {
                break;
            }
        }
    });
}

/// Forwards UDP datagrams to `target`, delaying the client-to-relay direction by `delay`
/// (precise to the OS scheduler, not a 1 ms timer wheel); answers come back at once. Each
/// client gets its own upstream socket, so the relay sees distinct clients.
fn delay_udp(target: SocketAddr, delay: Duration, applied: Applied) -> SocketAddr {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").expect("bind"));
    let addr = front.local_addr().expect("addr");
    let (tx, rx) = mpsc::channel::<(Instant, Instant, (Arc<UdpSocket>, Vec<u8>))>();
    delay_line(rx, applied, |(sock, data)| {
        let _ = sock.send(&data);
        true
    });
    std::thread::spawn(move || {
        let backs: Mutex<HashMap<SocketAddr, Arc<UdpSocket>>> = Mutex::new(HashMap::new());
        let mut buf = [0u8; 65536];
        loop {
            let Ok((n, from)) = front.recv_from(&mut buf) else {
                return;
            };
            let received = Instant::now();
            let back = {
                let mut backs = backs.lock().expect("lock");
                Arc::clone(backs.entry(from).or_insert_with(|| {
                    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").expect("bind"));
                    back.connect(target).expect("connect");
                    let (back2, front2) = (Arc::clone(&back), Arc::clone(&front));
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 65536];
                        while let Ok(n) = back2.recv(&mut buf) {
                            let _ = front2.send_to(&buf[..n], from);
                        }
                    });
                    back
                }))
            };
            if tx
                .send((received, received + delay, (back, buf[..n].to_vec())))
                .is_err()
            {
                return;
            }
        }
    });
    addr
}

/// The same for TCP: bytes towards the relay are held back by `delay`.
fn delay_tcp(target: SocketAddr, delay: Duration, applied: Applied) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(upstream) = TcpStream::connect(target) else {
                continue;
            };
            let _ = (client.set_nodelay(true), upstream.set_nodelay(true));
            let (mut c_read, mut c_write) = (client.try_clone().expect("clone"), client);
            let (mut u_read, mut u_write) = (upstream.try_clone().expect("clone"), upstream);
            let (tx, rx) = mpsc::channel::<(Instant, Instant, Option<Vec<u8>>)>();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                loop {
                    let n = c_read.read(&mut buf).unwrap_or(0);
                    let received = Instant::now();
                    // None passes the client's end of stream on, after the same delay.
                    let item = (n > 0).then(|| buf[..n].to_vec());
                    if tx.send((received, received + delay, item)).is_err() || n == 0 {
                        break;
                    }
                }
            });
            delay_line(rx, applied.clone(), move |data| match data {
                Some(d) => u_write.write_all(&d).is_ok(),
                None => {
                    let _ = u_write.shutdown(std::net::Shutdown::Write);
                    false
                }
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut u_read, &mut c_write);
                let _ = c_write.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

fn probe(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_turnpike-probe"))
        .args(args)
        .env_remove("HTTPS_PROXY")
        .output()
        .expect("run turnpike-probe");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn json(text: &str) -> serde_json::Value {
    let line = text
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON:\n{text}"));
    serde_json::from_str(line).expect("JSON")
}

fn path<'a>(report: &'a serde_json::Value, region: &str, path: &str) -> &'a serde_json::Value {
    report["results"]
        .as_array()
        .expect("results")
        .iter()
        .find(|r| r["region"] == region && r["path"] == path)
        .unwrap_or_else(|| panic!("no {region}/{path} in {report}"))
}

fn relay(extra: &[&str]) -> Relay {
    let mut args = vec![
        "--listen",
        "tcp://127.0.0.1:0",
        "--allow-peer",
        "127.0.0.0/8",
        "--user",
        "alice:wonderland",
    ];
    args.extend_from_slice(extra);
    Relay::start(&args)
}

/// Three relays 5, 25 and 60 ms away and a reference relay behind the same proxies with no
/// delay, probed in one run: the nearest is chosen, the medians rank the relays by distance,
/// and each path's fastest sample exceeds the reference's by the delay the proxy applied. The
/// reference carries what this machine adds itself (a debug relay, the proxies' threads,
/// wake-ups of idle threads: about 1 ms here), and the fastest sample of the three rounds
/// leaves out what other work on busy cores adds to some samples (under a concurrent build,
/// every sample of one path in one round can be late), so the comparison holds on a slow,
/// loaded machine as well as on a quiet one.
#[test]
fn picks_the_nearest_of_three_relays_with_accurate_rtts() {
    let delays = [
        ("reference", 0u64),
        ("near", 5),
        ("middle", 25),
        ("far", 60),
    ];
    let relays: Vec<Relay> = delays.iter().map(|_| relay(&[])).collect();
    let dir = TestCert::new("probe-regions", &["unused"]);
    let mut file = String::new();
    let mut applied = Vec::new();
    for ((name, ms), r) in delays.iter().zip(&relays) {
        let d = Duration::from_millis(*ms);
        let (on_udp, on_tcp) = (Applied::default(), Applied::default());
        let udp = delay_udp(r.udp, d, on_udp.clone());
        let tcp = delay_tcp(r.addr_of("tcp"), d, on_tcp.clone());
        applied.push((on_udp, on_tcp));
        file += &format!(
            "[[region]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\nudp_port = {}\ntcp_port = {}\nusername = \"alice\"\npassword = \"wonderland\"\n\n",
            udp.port(),
            tcp.port()
        );
    }
    let regions = dir.dir.join("regions.toml");
    std::fs::write(&regions, file).expect("regions");
    // Each path's fastest sample over the three rounds, and the proxies' least hold and widest
    // spread over them: one quiet moment in the run is enough for the comparison, so a loaded
    // machine that slows every sample of one path in one round does not decide it.
    let mut fastest: HashMap<(usize, &str), f64> = HashMap::new();
    let mut injected_least: HashMap<(usize, &str), f64> = HashMap::new();
    let mut spread_most: HashMap<(usize, &str), f64> = HashMap::new();
    for round in 0..3 {
        let (ok, out) = probe(&[
            "measure",
            "--regions",
            regions.to_str().expect("path"),
            "--json",
            "--samples",
            "7",
        ]);
        assert!(ok, "{out}");
        let report = json(&out);
        assert_eq!(report["selected"], "reference", "round {round}: {report}");
        let rtt = |name: &str, p: &str, figure: &str| {
            let r = path(&report, name, p);
            assert_eq!(r["reachable"], true, "{r}");
            r["rtt_ms"][figure].as_f64().expect("rtt")
        };
        let (udp, tcp): (Vec<Held>, Vec<Held>) =
            applied.iter().map(|(u, t)| (u.take(), t.take())).unzip();
        let ranked: Vec<f64> = delays
            .iter()
            .map(|(n, _)| rtt(n, "turn-udp", "median"))
            .collect();
        assert!(
            ranked.windows(2).all(|w| w[0] < w[1]),
            "round {round}: turn-udp medians out of order: {ranked:?}"
        );
        for (i, (name, _)) in delays.iter().enumerate() {
            for (p, applied) in [("stun-udp", &udp), ("turn-udp", &udp), ("turn-tcp", &tcp)] {
                let f = fastest.entry((i, p)).or_insert(f64::INFINITY);
                *f = f.min(rtt(name, p, "min"));
                if i > 0 {
                    let injected = applied[i].least - applied[0].least;
                    let e = injected_least.entry((i, p)).or_insert(f64::INFINITY);
                    *e = e.min(injected);
                    // How much the proxy's own holds varied (its sleeps wake late on a busy
                    // machine) widens the allowance by as much.
                    let spread = (applied[i].median - applied[i].least)
                        + (applied[0].median - applied[0].least);
                    let s = spread_most.entry((i, p)).or_insert(0.0);
                    *s = s.max(spread);
                }
            }
        }
    }
    for (i, (name, ms)) in delays.iter().enumerate().skip(1) {
        for p in ["stun-udp", "turn-udp", "turn-tcp"] {
            let (injected, spread) = (injected_least[&(i, p)], spread_most[&(i, p)]);
            let extra = fastest[&(i, p)] - fastest[&(0, p)];
            assert!(
                (extra - injected).abs() <= 1.0 + 0.05 * injected + spread,
                "{name}/{p}: {extra:.2} ms above the reference for {injected:.2} ms injected ({ms} ms asked, proxy spread {spread:.2} ms)"
            );
        }
    }
}

#[test]
fn every_unreachable_path_says_why() {
    // A relay with no UDP listener (UDP "blocked"), one with a wrong password, one down, one
    // that does not resolve.
    let cert = TestCert::new("probe-tls", &["turn.test", "127.0.0.1"]);
    let tcp_only = Relay::spawn(&[
        "--listen",
        "tcp://127.0.0.1:0",
        "--listen",
        "tls://127.0.0.1:0",
        "--cert",
        cert.cert.to_str().expect("p"),
        "--key",
        cert.key.to_str().expect("p"),
        "--relay-ip",
        "127.0.0.1",
        "--allow-peer",
        "127.0.0.0/8",
        "--user",
        "alice:wonderland",
        "--realm",
        common::REALM,
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let closed_udp = UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let closed_tcp = free_port();
    // Accepts TCP connections (the kernel completes them into the backlog) and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_port = silent.local_addr().expect("addr").port();
    let other = relay(&[]);
    let file = format!(
        r#"
[[region]]
name = "tcp-only"
host = "127.0.0.1"
udp_port = {closed_udp}
tcp_port = {tcp}
tls_port = {tls}
tls_name = "turn.test"
ca_file = "{ca}"
username = "alice"
password = "wonderland"

[[region]]
name = "wrong-password"
host = "127.0.0.1"
udp_port = {other_udp}
username = "alice"
password = "not-it"

[[region]]
name = "down"
host = "127.0.0.1"
tcp_port = {closed_tcp}
username = "alice"
password = "wonderland"

[[region]]
name = "nowhere"
host = "relay.invalid"
udp_port = 3478
username = "alice"
password = "wonderland"

[[region]]
name = "silent"
host = "127.0.0.1"
tcp_port = {silent_port}
username = "alice"
password = "wonderland"
"#,
        tcp = tcp_only.addr_of("tcp").port(),
        tls = tcp_only.addr_of("tls").port(),
        ca = cert.cert.display(),
        other_udp = other.udp.port(),
    );
    let regions = cert.dir.join("regions.toml");
    std::fs::write(&regions, file).expect("regions");
    let (ok, out) = probe(&[
        "measure",
        "--regions",
        regions.to_str().expect("path"),
        "--json",
        "--samples",
        "3",
        "--timeout-ms",
        "500",
    ]);
    assert!(ok, "{out}");
    let report = json(&out);
    assert_eq!(report["selected"], "tcp-only", "{report}");
    let error = |region: &str, p: &str| {
        let r = path(&report, region, p);
        assert_eq!(r["reachable"], false, "{r}");
        r["error"].as_str().expect("error").to_owned()
    };
    assert!(
        error("tcp-only", "turn-udp").starts_with("refused"),
        "{report}"
    );
    assert!(
        error("tcp-only", "stun-udp").starts_with("refused"),
        "{report}"
    );
    assert_eq!(path(&report, "tcp-only", "turn-tcp")["reachable"], true);
    // Its voice-call estimate, near the ceiling on loopback; none where nothing came back.
    let voice = &path(&report, "tcp-only", "turn-tcp")["voice"];
    assert!(
        voice["mos"]
            .as_f64()
            .is_some_and(|m| (4.3..=4.41).contains(&m))
            && voice["rating"] == "best",
        "{voice}"
    );
    assert!(path(&report, "tcp-only", "turn-udp")["voice"].is_null());
    let tls = path(&report, "tcp-only", "turn-tls");
    assert_eq!(tls["reachable"], true, "{tls}");
    assert!(tls["tls_handshake_ms"].as_f64().is_some());
    assert!(
        error("wrong-password", "turn-udp").starts_with("401"),
        "{report}"
    );
    assert_eq!(
        path(&report, "wrong-password", "stun-udp")["reachable"],
        true,
        "STUN needs no credentials"
    );
    assert!(error("down", "turn-tcp").starts_with("refused"), "{report}");
    assert!(error("nowhere", "stun-udp").starts_with("dns"), "{report}");

    // The table and the firewall report say the same for people, and tell apart what was
    // seen: a port nothing listens on, one that accepts but does not speak TURN, a relay
    // that refused the credentials, a name that does not resolve, and the relay ports,
    // never tried where no UDP allocation was made.
    let (_, table) = probe(&[
        "measure",
        "--regions",
        regions.to_str().expect("path"),
        "--samples",
        "2",
        "--timeout-ms",
        "500",
        "--firewall",
    ]);
    assert!(table.contains("selected: tcp-only via turn-tcp"), "{table}");
    let row = |port: u16, purpose: &str| {
        table
            .lines()
            .find(|l| l.split_whitespace().nth(2) == Some(&port.to_string()) && l.contains(purpose))
            .unwrap_or_else(|| panic!("no row for {port} ({purpose}):\n{table}"))
            .to_owned()
    };
    assert!(
        row(closed_tcp, "TURN over TCP").contains("REFUSED by the host (nothing listening)"),
        "{table}"
    );
    // The address the destination resolved to, beside its name.
    assert_eq!(
        row(closed_tcp, "TURN over TCP").split_whitespace().nth(1),
        Some("127.0.0.1"),
        "{table}"
    );
    assert!(
        row(silent_port, "TURN over TCP").contains("REACHED, but no TURN answer"),
        "{table}"
    );
    assert!(
        row(other.udp.port(), "STUN and TURN").contains("open, but the relay refused: 401"),
        "{table}"
    );
    assert!(
        row(closed_udp, "STUN and TURN").contains("REFUSED by the host"),
        "{table}"
    );
    let relayed: Vec<&str> = table
        .lines()
        .filter(|l| l.contains("relayed media"))
        .collect();
    assert!(
        relayed.iter().all(|l| l.contains("not tested")) && relayed.len() == 3,
        "{table}"
    );
    assert!(table.contains("UNKNOWN: dns"), "{table}");
    assert!(
        !table.contains("BLOCKED"),
        "nothing here was blocked on the way:\n{table}"
    );
    assert!(table.contains("TURN over TLS"), "{table}");
    // Progress on stderr while the paths wait.
    assert!(
        table.contains("turnpike-probe: silent turn-tcp: probing"),
        "{table}"
    );
    // The same rows in the JSON.
    let (_, out) = probe(&[
        "measure",
        "--regions",
        regions.to_str().expect("path"),
        "--samples",
        "2",
        "--timeout-ms",
        "500",
        "--firewall",
        "--json",
    ]);
    let rows = json(&out)["firewall"]
        .as_array()
        .expect("firewall rows")
        .clone();
    let verdict = |port: u16| {
        rows.iter()
            .find(|r| r["port"] == port.to_string().as_str() && r["protocol"] == "TCP")
            .unwrap_or_else(|| panic!("no row for {port}: {rows:?}"))["verdict"]
            .clone()
    };
    assert_eq!(verdict(closed_tcp), "refused");
    assert!(
        rows.iter()
            .filter(|r| r["destination"] == "127.0.0.1")
            .all(|r| r["addresses"] == serde_json::json!(["127.0.0.1"])),
        "{rows:?}"
    );
    assert_eq!(verdict(silent_port), "not_answering");
    assert_eq!(verdict(tcp_only.addr_of("tcp").port()), "open");
    drop(silent);
}

#[test]
fn tls_through_a_real_connect_proxy_and_fresh_ice_servers() {
    let cert = TestCert::new("probe-proxy", &["turn.test", "127.0.0.1"]);
    let relay = Relay::spawn(&[
        "--listen",
        "udp://127.0.0.1:0",
        "--listen",
        "tls://127.0.0.1:0",
        "--cert",
        cert.cert.to_str().expect("p"),
        "--key",
        cert.key.to_str().expect("p"),
        "--relay-ip",
        "127.0.0.1",
        "--allow-peer",
        "127.0.0.0/8",
        "--auth-secret",
        "fleet-secret",
        "--realm",
        common::REALM,
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let tls = relay.addr_of("tls").port();
    let proxy_port = free_port();
    let conf = cert.dir.join("tinyproxy.conf");
    std::fs::write(&conf, format!("Port {proxy_port}\nListen 127.0.0.1\nAllow 127.0.0.1\nConnectPort {tls}\nMaxClients 10\n")).expect("conf");
    let _proxy = Child2(
        Command::new("tinyproxy")
            .args(["-d", "-c", conf.to_str().expect("path")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tinyproxy (.ci/run installs it)"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", proxy_port)).is_err() {
        assert!(Instant::now() < deadline, "tinyproxy did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let regions = cert.dir.join("regions.toml");
    std::fs::write(
        &regions,
        format!(
            "[[region]]\nname = \"eu\"\nhost = \"127.0.0.1\"\nudp_port = {}\ntls_port = {tls}\ntls_name = \"turn.test\"\nca_file = \"{}\"\nsecret = \"fleet-secret\"\n",
            relay.udp.port(),
            cert.cert.display()
        ),
    )
    .expect("regions");
    let proxy = format!("http://127.0.0.1:{proxy_port}");
    let (ok, out) = probe(&[
        "measure",
        "--regions",
        regions.to_str().expect("p"),
        "--json",
        "--samples",
        "3",
        "--proxy",
        &proxy,
        "--prefer",
        "tls-proxy,udp",
    ]);
    assert!(ok, "{out}");
    let report = json(&out);
    let via = path(&report, "eu", "turn-tls-proxy");
    assert_eq!(via["reachable"], true, "{via}");
    assert_eq!(report["selected_path"], "turn-tls-proxy", "{report}");

    // A proxy that refuses CONNECT to the relay is named as the reason.
    let refusing = format!("http://127.0.0.1:{proxy_port}");
    std::fs::write(
        &regions,
        format!("[[region]]\nname = \"eu\"\nhost = \"127.0.0.1\"\ntls_port = {}\nsecret = \"fleet-secret\"\n", free_port()),
    )
    .expect("regions");
    let (_, out) = probe(&[
        "measure",
        "--regions",
        regions.to_str().expect("p"),
        "--json",
        "--samples",
        "1",
        "--proxy",
        &refusing,
    ]);
    let report = json(&out);
    let err = path(&report, "eu", "turn-tls-proxy")["error"]
        .as_str()
        .expect("error")
        .to_owned();
    assert!(
        err.starts_with("proxy:") && err.contains("refused"),
        "{err}"
    );

    // --ice-servers: fresh ephemeral credentials that the relay accepts.
    std::fs::write(
        &regions,
        format!("[[region]]\nname = \"eu\"\nhost = \"127.0.0.1\"\nudp_port = {}\nsecret = \"fleet-secret\"\n", relay.udp.port()),
    )
    .expect("regions");
    let (ok, out) = probe(&[
        "measure",
        "--regions",
        regions.to_str().expect("p"),
        "--samples",
        "3",
        "--ice-servers",
    ]);
    assert!(ok, "{out}");
    let start = out.find("[\n").expect("iceServers JSON");
    // The array, without the progress lines stderr adds after it.
    let servers: serde_json::Value = serde_json::Deserializer::from_str(&out[start..])
        .into_iter()
        .next()
        .expect("iceServers")
        .expect("iceServers");
    let turn = &servers[1];
    let user = turn["username"].as_str().expect("username");
    let pass = turn["credential"].as_str().expect("credential");
    assert!(
        user.split(':')
            .next()
            .and_then(|t| t.parse::<u64>().ok())
            .is_some(),
        "{user}"
    );
    let mut c = common::RawClient::new(relay.udp, user, pass);
    assert_eq!(c.allocate().code(), None);
}

#[test]
fn watch_serves_prometheus_metrics() {
    let relay = relay(&[]);
    let dir = TestCert::new("probe-watch", &["unused"]);
    let regions = dir.dir.join("regions.toml");
    std::fs::write(
        &regions,
        format!("[[region]]\nname = \"eu\"\nhost = \"127.0.0.1\"\nudp_port = {}\nusername = \"alice\"\npassword = \"wonderland\"\n", relay.udp.port()),
    )
    .expect("regions");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let _watch = Child2(
        Command::new(env!("CARGO_BIN_EXE_turnpike-probe"))
            .args([
                "watch",
                "--regions",
                regions.to_str().expect("p"),
                "--listen",
                &listen,
                "--every",
                "1",
                "--rounds",
                "30",
                "--samples",
                "2",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("watch"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        assert!(Instant::now() < deadline, "no probe round in 20 s");
        if let Ok(mut s) = TcpStream::connect(&listen) {
            let _ = write!(s, "GET /metrics HTTP/1.0\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            if out.contains("turnpike_probe_rounds_total 1")
                || out.contains("turnpike_probe_rounds_total 2")
            {
                break out
                    .split_once("\r\n\r\n")
                    .map(|(_, b)| b.to_owned())
                    .unwrap_or_default();
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .expect("Prometheus text");
    let value = |name: &str, labels: &[(&str, &str)]| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    };
    assert_eq!(
        value(
            "turnpike_probe_up",
            &[("region", "eu"), ("path", "turn-udp")]
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value("turnpike_probe_selected", &[("region", "eu")]),
        Some(1.0),
        "{body}"
    );
    // A round trip on loopback: above nothing, well under a second, at most its p95.
    let rtt = |stat| {
        value(
            "turnpike_probe_rtt_ms",
            &[("region", "eu"), ("path", "stun-udp"), ("stat", stat)],
        )
        .unwrap_or(f64::NAN)
    };
    assert!(
        rtt("median") > 0.0 && rtt("median") < 1000.0 && rtt("median") <= rtt("p95"),
        "{body}"
    );
    // Loopback, nothing lost: a voice call would score near G.711's ceiling of 4.41.
    let mos = value(
        "turnpike_probe_mos",
        &[("region", "eu"), ("path", "turn-udp")],
    );
    assert!(mos.is_some_and(|m| (4.3..=4.41).contains(&m)), "{body}");
}

#[test]
fn echo_ports_and_the_websocket_echo_are_probed() {
    let cert = TestCert::new("probe-echo", &["turn.test", "127.0.0.1"]);
    let relay = Relay::spawn(&[
        "--listen",
        "udp://127.0.0.1:0",
        "--listen",
        "tls://127.0.0.1:0",
        "--cert",
        cert.cert.to_str().expect("p"),
        "--key",
        cert.key.to_str().expect("p"),
        "--relay-ip",
        "127.0.0.1",
        "--allow-peer",
        "127.0.0.0/8",
        "--user",
        "alice:wonderland",
        "--realm",
        common::REALM,
        "--metrics-listen",
        "127.0.0.1:0",
        "--echo-udp",
        "127.0.0.1:0",
        "--echo-tcp",
        "127.0.0.1:0",
        "--echo-websocket",
    ]);
    let udp_echo = relay.addr_of("echo-udp").port();
    let tcp_echo = relay.addr_of("echo-tcp").port();
    let closed = UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let regions = cert.dir.join("regions.toml");
    std::fs::write(
        &regions,
        format!(
            "[[region]]\nname = \"eu\"\nhost = \"127.0.0.1\"\nudp_port = {}\ntls_port = {}\ntls_name = \"turn.test\"\nca_file = \"{}\"\nusername = \"alice\"\npassword = \"wonderland\"\necho_udp = [{udp_echo}, {closed}]\necho_tcp = [{tcp_echo}]\nwebsocket = true\n",
            relay.udp.port(),
            relay.addr_of("tls").port(),
            cert.cert.display()
        ),
    )
    .expect("regions");
    let (ok, out) = probe(&[
        "measure",
        "--regions",
        regions.to_str().expect("p"),
        "--json",
        "--samples",
        "3",
        "--timeout-ms",
        "500",
    ]);
    assert!(ok, "{out}");
    let report = json(&out);
    for p in [
        format!("echo-udp:{udp_echo}"),
        format!("echo-tcp:{tcp_echo}"),
    ] {
        let r = path(&report, "eu", &p);
        assert_eq!(r["reachable"], true, "{r}");
        // The echo tells the probe the address it saw: its NAT mapping.
        assert!(
            r["mapped"]
                .as_str()
                .is_some_and(|m| m.starts_with("127.0.0.1:")),
            "{r}"
        );
    }
    let ws = path(&report, "eu", "websocket");
    assert_eq!(ws["reachable"], true, "{ws}");
    let blocked = path(&report, "eu", &format!("echo-udp:{closed}"));
    assert_eq!(blocked["reachable"], false);
    assert!(
        blocked["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("refused")),
        "{blocked}"
    );
}

/// A relay with shared relay ports: the probe's TURN paths (two allocations of one relay
/// reaching each other) pass, and the firewall table lists the few ports regions.toml names
/// instead of the default range.
#[test]
fn shared_relay_ports_pass_the_turn_paths_and_the_firewall_table_lists_them() {
    let range = common::free_port_range(8);
    let (first, last) = (*range.start(), *range.end());
    let ports = format!("{first}-{last}");
    let r = relay(&[
        "--relay-ports",
        &ports,
        "--threads",
        "2",
        "--shared-relay-ports",
        "2",
    ]);
    let shared = format!("{first}-{}", first + 3);
    let dir = TestCert::new("probe-shared", &["unused"]);
    let regions = dir.dir.join("regions.toml");
    std::fs::write(
        &regions,
        format!(
            "[[region]]\nname = \"shared\"\nhost = \"127.0.0.1\"\nudp_port = {}\ntcp_port = {}\nusername = \"alice\"\npassword = \"wonderland\"\nrelay_ports = [\"{shared}\"]\n",
            r.udp.port(),
            r.addr_of("tcp").port()
        ),
    )
    .expect("regions");
    let (ok, out) = probe(&[
        "measure",
        "--regions",
        regions.to_str().expect("path"),
        "--json",
        "--samples",
        "3",
    ]);
    assert!(ok, "{out}");
    let report = json(&out);
    for p in ["turn-udp", "turn-tcp"] {
        assert_eq!(path(&report, "shared", p)["reachable"], true, "{report}");
    }
    let (_, table) = probe(&[
        "measure",
        "--regions",
        regions.to_str().expect("path"),
        "--samples",
        "2",
        "--firewall",
    ]);
    let media = table
        .lines()
        .find(|l| l.contains("relayed media"))
        .unwrap_or_else(|| panic!("no relayed media row:\n{table}"));
    assert!(
        media.contains(&shared)
            && media.contains("open: datagrams crossed")
            && media.contains("both ways"),
        "{table}"
    );
    assert!(!table.contains("49152-65535"), "{table}");
}

/// `--capture`: a pcapng file Wireshark's tshark reads without a malformed packet, with as many
/// packets as the probe said it wrote, the STUN and TURN messages decoded, TLS as TLS records,
/// one interface per path, and each path's first packet naming the path and its verdict.
#[test]
fn the_capture_file_is_what_tshark_decodes() {
    let cert = TestCert::new("probe-capture", &["turn.test", "127.0.0.1"]);
    let r = relay(&[
        "--listen",
        "tls://127.0.0.1:0",
        "--cert",
        cert.cert.to_str().expect("p"),
        "--key",
        cert.key.to_str().expect("p"),
    ]);
    let closed_udp = free_port();
    let regions = cert.dir.join("regions.toml");
    std::fs::write(
        &regions,
        format!(
            "[[region]]\nname = \"local\"\nhost = \"127.0.0.1\"\nudp_port = {}\ntcp_port = {}\ntls_port = {}\ntls_name = \"turn.test\"\nca_file = \"{}\"\nusername = \"alice\"\npassword = \"wonderland\"\n\n[[region]]\nname = \"down\"\nhost = \"127.0.0.1\"\nudp_port = {closed_udp}\nusername = \"alice\"\npassword = \"wonderland\"\n",
            r.udp.port(),
            r.addr_of("tcp").port(),
            r.addr_of("tls").port(),
            cert.cert.display()
        ),
    )
    .expect("regions");
    let file = cert.dir.join("probe.pcapng");
    let (_, out) = probe(&[
        "measure",
        "--regions",
        regions.to_str().expect("path"),
        "--samples",
        "3",
        "--timeout-ms",
        "500",
        "--capture",
        file.to_str().expect("path"),
    ]);
    let written = packets_written(&out);
    let tshark = |args: &[&str]| tshark(&file, args);
    // The relay's ports as STUN, as the README tells IT to decode a relay on other ports.
    let decode = [
        "-d",
        &format!("udp.port=={},stun", r.udp.port()),
        "-d",
        &format!("tcp.port=={},stun", r.addr_of("tcp").port()),
        "-d",
        &format!("tcp.port=={},tls", r.addr_of("tls").port()),
    ]
    .map(|s| s.to_owned());
    let decode: Vec<&str> = decode.iter().map(String::as_str).collect();
    let all = tshark(&decode);
    assert_eq!(all.lines().count(), written, "{all}");
    let mut filter = decode.clone();
    filter.extend(["-Y", "_ws.malformed || _ws.expert.severity >= error"]);
    assert_eq!(tshark(&filter).trim(), "", "malformed packets:\n{all}");
    for (shown, what) in [
        ("Allocate Success Response", "TURN over UDP and TCP"),
        ("Binding Success Response", "STUN"),
        ("CreatePermission", "permissions"),
        ("Application Data", "TLS records"),
    ] {
        assert!(all.contains(shown), "no {what} ({shown}):\n{all}");
    }
    let comments = tshark(&[
        "-Y",
        "frame.comment",
        "-T",
        "fields",
        "-e",
        "frame.interface_name",
        "-e",
        "frame.comment",
    ]);
    for (path, verdict) in [
        ("local stun-udp", "open"),
        ("local turn-udp", "open"),
        ("local turn-tcp", "open"),
        ("local turn-tls", "open"),
        ("down stun-udp", "REFUSED by the host"),
    ] {
        assert!(
            comments
                .lines()
                .any(|l| l.starts_with(&format!("{path}\t{path}: {verdict}"))),
            "no comment for {path}: {verdict}:\n{comments}"
        );
    }
}

/// `--bandwidth`: a relay that carries the rate meets the requirement over UDP and TCP; one
/// whose per-allocation quota is below it does not, and says how much got through.
#[test]
fn bandwidth_through_the_relay_meets_or_misses_the_requirement() {
    let open = relay(&[]);
    // 62,500 bytes a second per allocation: 0.5 Mbit/s.
    let limited = relay(&["--max-bps", "62500"]);
    let cert = TestCert::new("probe-bandwidth", &["unused"]);
    let regions = cert.dir.join("regions.toml");
    std::fs::write(
        &regions,
        format!(
            "[[region]]\nname = \"open\"\nhost = \"127.0.0.1\"\nudp_port = {}\ntcp_port = {}\nusername = \"alice\"\npassword = \"wonderland\"\n\n[[region]]\nname = \"limited\"\nhost = \"127.0.0.1\"\nudp_port = {}\nusername = \"alice\"\npassword = \"wonderland\"\n",
            open.udp.port(),
            open.addr_of("tcp").port(),
            limited.udp.port()
        ),
    )
    .expect("regions");
    let (ok, out) = probe(&[
        "measure",
        "--regions",
        regions.to_str().expect("path"),
        "--samples",
        "2",
        "--bandwidth",
        "2M",
        "--bandwidth-secs",
        "2",
        "--json",
    ]);
    assert!(ok, "{out}");
    let report = json(&out);
    for p in ["turn-udp", "turn-tcp"] {
        let b = &path(&report, "open", p)["bandwidth"];
        assert_eq!(b["meets"], true, "{p}: {b}");
        assert_eq!(b["required_mbps"], 2.0, "{b}");
        assert!(
            b["received_mbps"].as_f64().is_some_and(|m| m >= 1.9),
            "{p}: {b}"
        );
        assert!(b["rtt_ms"].as_f64().is_some(), "{b}");
        assert_eq!(b["video"], "540p", "{b}");
    }
    let b = &path(&report, "limited", "turn-udp")["bandwidth"];
    assert_eq!(b["meets"], false, "{b}");
    assert!(
        b["received_mbps"]
            .as_f64()
            .is_some_and(|m| m > 0.2 && m < 1.0),
        "the quota's 0.5 Mbit/s (and its burst) got through: {b}"
    );
    // Paths without a relay in between are not bandwidth-tested.
    assert!(path(&report, "open", "stun-udp")["bandwidth"].is_null());
}

/// A real proxy that inspects TLS (mitmproxy, re-signing with its own CA): the probe names the
/// issuer it was shown and says what to ask for; with the relay's key pinned (`tls_spki`) it
/// tells inspection even where the proxy's CA is trusted, and the relay's own certificate
/// passes the pin.
#[test]
fn a_proxy_that_inspects_tls_is_named_with_its_issuer() {
    let cert = TestCert::new("probe-mitm", &["turn.test", "127.0.0.1"]);
    let r = relay(&[
        "--listen",
        "tls://127.0.0.1:0",
        "--cert",
        cert.cert.to_str().expect("p"),
        "--key",
        cert.key.to_str().expect("p"),
    ]);
    let tls = r.addr_of("tls").port();
    let proxy_port = free_port();
    let confdir = cert.dir.join("mitmproxy");
    let _proxy = Child2(
        Command::new("mitmdump")
            .args(["--listen-host", "127.0.0.1", "-p", &proxy_port.to_string()])
            .args(["--set", &format!("confdir={}", confdir.display())])
            // It reaches the relay's self-signed certificate itself.
            .args(["--ssl-insecure", "-q"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mitmdump (.ci/run installs mitmproxy)"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", proxy_port)).is_err() {
        assert!(Instant::now() < deadline, "mitmdump did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let relay_der = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_file(&cert.cert).expect("relay cert")
    };
    let pin = turnpike_probe::inspect::seen(&relay_der)
        .expect("parses")
        .spki;
    let mitm_ca = confdir.join("mitmproxy-ca-cert.pem");
    let regions = cert.dir.join("regions.toml");
    let region = |name: &str, ca: &std::path::Path, pinned: bool| {
        format!(
            "[[region]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\ntls_port = {tls}\ntls_name = \"turn.test\"\nca_file = \"{}\"\nusername = \"alice\"\npassword = \"wonderland\"\n{}\n",
            ca.display(),
            if pinned { format!("tls_spki = \"{pin}\"\n") } else { String::new() }
        )
    };
    std::fs::write(
        &regions,
        region("trusting-relay", &cert.cert, false) + &region("trusting-proxy", &mitm_ca, true),
    )
    .expect("regions");
    let proxy = format!("http://127.0.0.1:{proxy_port}");
    let (_, out) = probe(&[
        "measure",
        "--regions",
        regions.to_str().expect("path"),
        "--samples",
        "2",
        "--proxy",
        &proxy,
        "--json",
        "--firewall",
    ]);
    let report = json(&out);
    let error = |region: &str, p: &str| {
        path(&report, region, p)["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error for {region} {p}: {report}"))
            .to_owned()
    };
    // Directly, the relay's certificate: it works where its CA is trusted.
    assert_eq!(
        path(&report, "trusting-relay", "turn-tls")["reachable"],
        true,
        "{report}"
    );
    // Through the proxy: a certificate from mitmproxy's CA, which this client does not trust.
    let e = error("trusting-relay", "turn-tls-proxy");
    assert!(
        e.starts_with("tls-inspection:") && e.contains("mitmproxy") && e.contains("bypass list"),
        "{e}"
    );
    // The proxy's CA trusted (as a company installs it), the relay's key pinned: the proxy is
    // caught by the pin...
    let e = error("trusting-proxy", "turn-tls-proxy");
    assert!(
        e.starts_with("tls-inspection:") && e.contains("tls_spki") && e.contains("mitmproxy"),
        "{e}"
    );
    // ...and the relay's own certificate, which that CA did not sign, is not called inspection.
    let e = error("trusting-proxy", "turn-tls");
    assert!(e.starts_with("tls:"), "{e}");
    let rows = report["firewall"].as_array().expect("rows");
    assert!(
        rows.iter()
            .any(|r| r["protocol"] == "HTTP CONNECT" && r["verdict"] == "inspected"),
        "{rows:?}"
    );
}

/// `--report`: one self-contained HTML file that headless Chromium renders loading nothing
/// else, saying what to open, what was refused, the figures and a chart per region; the
/// screenshot shows each verdict's badge in its colour.
#[test]
fn the_html_report_renders_on_its_own_and_says_what_to_do() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    for module in ["playwright-core", "pngjs"] {
        assert!(
            std::path::Path::new(&format!("{root}/tests/browser/node_modules/{module}")).exists(),
            "run `npm ci` in tests/browser (.ci/run does)"
        );
    }
    let r = relay(&[]);
    let closed_tcp = free_port();
    let dir = TestCert::new("probe-report", &["unused"]);
    let regions = dir.dir.join("regions.toml");
    std::fs::write(
        &regions,
        format!(
            "[[region]]\nname = \"office-eu\"\nhost = \"127.0.0.1\"\nudp_port = {}\ntcp_port = {closed_tcp}\nusername = \"alice\"\npassword = \"wonderland\"\n",
            r.udp.port()
        ),
    )
    .expect("regions");
    let html = dir.dir.join("report.html");
    let (ok, out) = probe(&[
        "measure",
        "--regions",
        regions.to_str().expect("path"),
        "--samples",
        "3",
        "--timeout-ms",
        "500",
        "--bandwidth",
        "1M",
        "--bandwidth-secs",
        "1",
        "--report",
        html.to_str().expect("path"),
    ]);
    assert!(ok, "{out}");
    let page = std::fs::read_to_string(&html).expect("report");
    for external in ["<script", "<link", "src=", "@import", "url("] {
        assert!(
            !page.contains(external),
            "the report loads something: {external}"
        );
    }
    let shot = dir.dir.join("shot");
    let node = Command::new("node")
        .arg(format!("{root}/tests/browser/probe-report.mjs"))
        .arg(&html)
        .arg(&shot)
        .current_dir(format!("{root}/tests/browser"))
        .output()
        .expect("node (.ci/run installs it)");
    assert!(
        node.status.success(),
        "{}",
        String::from_utf8_lossy(&node.stderr)
    );
    let seen: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(shot.with_extension("json")).expect("json"))
            .expect("json");
    let requests: Vec<&str> = seen["requests"]
        .as_array()
        .expect("requests")
        .iter()
        .filter_map(|u| u.as_str())
        .collect();
    assert_eq!(requests.len(), 1, "only the file itself: {requests:?}");
    let text = seen["text"].as_str().expect("text");
    for want in [
        "Turnpike network report",
        "Calls would use office-eu over turn-udp",
        &format!("127.0.0.1 port {closed_tcp} answered that nothing listens there"),
        "REFUSED by the host (nothing listening)",
        "relayed media",
        "meets",
    ] {
        assert!(text.contains(want), "no {want:?} in:\n{text}");
    }
    // An RTT chart and a bandwidth chart, with a bar per measured path.
    let svgs: Vec<u64> = seen["svgs"]
        .as_array()
        .expect("svgs")
        .iter()
        .filter_map(|v| v.as_u64())
        .collect();
    assert!(svgs.len() == 2 && svgs[0] >= 2 && svgs[1] == 1, "{svgs:?}");
    let badges = seen["badges"].as_array().expect("badges");
    assert!(badges.len() >= 3, "{badges:?}");
    for b in badges {
        let c: Vec<i64> = b["rgb"]
            .as_array()
            .expect("rgb")
            .iter()
            .map(|v| v.as_i64().unwrap_or(-1))
            .collect();
        let want = match b["verdict"].as_str().expect("verdict") {
            "ok" => [0x1a, 0x7f, 0x37],
            "fail" => [0xcf, 0x22, 0x2e],
            "warn" => [0x9a, 0x67, 0x00],
            _ => [0x6e, 0x77, 0x81],
        };
        assert!(
            c.iter().zip(want).all(|(a, w)| (a - w).abs() <= 24),
            "badge {b} is not painted as its verdict"
        );
    }
}

/// Runs tests/netns/probe-behind-proxy.sh in a namespace of its own, in `mode`; its output.
fn office(cert: &TestCert, mode: &str) -> String {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    common::run_tool(
        "unshare",
        &[
            "--net",
            "--fork",
            &format!("{root}/tests/netns/probe-behind-proxy.sh"),
            common::relay_binary().to_str().expect("path"),
            env!("CARGO_BIN_EXE_turnpike-probe"),
            cert.cert.to_str().expect("path"),
            cert.key.to_str().expect("path"),
            cert.dir.to_str().expect("path"),
            mode,
        ],
        180,
    )
}

/// A network that lets UDP 3478 through but drops the relay ports (a relay's firewall, built
/// with iptables in a namespace the test makes): the TURN paths work, since the two
/// allocations' round trip stays inside the relay, and the relay ports row says BLOCKED, from
/// a plain UDP socket that tried them as a peer does. Needs root (unshare) and iptables.
#[test]
fn relay_ports_dropped_on_the_way_are_blocked_in_the_firewall_rows() {
    let cert = TestCert::new("probe-relay-ports", &["10.99.0.1"]);
    let ran = office(&cert, "relay-ports");
    assert!(ran.contains("probe ran"), "{ran}");
    let text = std::fs::read_to_string(cert.dir.join("table.json")).unwrap_or_default();
    let err = std::fs::read_to_string(cert.dir.join("probe.err")).unwrap_or_default();
    let doc: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}\n{err}"));
    assert_eq!(
        path(&doc, "eu-office", "turn-udp")["reachable"],
        true,
        "{doc}"
    );
    let rows = doc["firewall"].as_array().expect("rows");
    let row = |port: &str| {
        rows.iter()
            .find(|r| r["port"] == port)
            .unwrap_or_else(|| panic!("no row {port}: {rows:?}"))
    };
    assert_eq!(row("3478")["verdict"], "open", "{rows:?}");
    let relayed = row("49152-65535");
    assert_eq!(relayed["verdict"], "blocked", "{relayed}");
    assert!(
        relayed["detail"]
            .as_str()
            .is_some_and(|d| d.contains("datagrams from here to the relayed address 10.99.0.1:")),
        "{relayed}"
    );
    let peer = &path(&doc, "eu-office", "turn-udp")["peer"];
    assert_eq!(
        (peer["inbound"].as_bool(), peer["outbound"].as_bool()),
        (Some(false), Some(false)),
        "{peer}"
    );
}

/// The case IT gets, end to end: a laptop behind a firewall that drops UDP to the relay and a
/// proxy that inspects TLS (network namespaces and a real mitmproxy), one probe run. The report
/// and the capture, read by someone who never saw Turnpike, say which port to open, that the
/// proxy breaks TLS to the relay, and what call quality to expect; the capture shows the
/// datagrams that went out and that nothing came back. Needs root (unshare), iptables,
/// mitmproxy and tshark (.ci/run installs them).
#[test]
fn behind_a_udp_dropping_tls_inspecting_proxy_the_report_and_capture_say_why() {
    let cert = TestCert::new("probe-office", &["10.99.0.1"]);
    let ran = office(&cert, "proxy");
    assert!(ran.contains("probe ran"), "{ran}");
    let read = |name: &str| std::fs::read_to_string(cert.dir.join(name)).unwrap_or_default();
    let (report, err) = (read("report.html"), read("probe.err"));
    for want in [
        "Allow UDP from this network to 10.99.0.1 port 3478, and the replies back in",
        "A proxy inspects TLS to 10.99.0.1: add 10.99.0.1 to its TLS-inspection bypass list",
        "mitmproxy",
        "Calls would use <b>eu-office</b> over <b>turn-tcp</b>",
        "BLOCKED on the way",
        "TLS INSPECTED on the way",
        "(best)",
    ] {
        assert!(
            report.contains(want),
            "no {want:?} in the report:\n{report}\n{err}"
        );
    }
    let file = cert.dir.join("probe.pcapng");
    let written = packets_written(&err);
    let tshark = |args: &[&str]| tshark(&file, args);
    assert_eq!(tshark(&[]).lines().count(), written);
    assert_eq!(
        tshark(&["-Y", "_ws.malformed || _ws.expert.severity >= error"]).trim(),
        ""
    );
    // UDP went out to the relay and nothing came back.
    assert!(
        tshark(&["-Y", "udp && ip.dst == 10.99.0.1"])
            .lines()
            .count()
            > 0
    );
    assert_eq!(tshark(&["-Y", "udp && ip.src == 10.99.0.1"]).trim(), "");
    let comments = tshark(&["-Y", "frame.comment", "-T", "fields", "-e", "frame.comment"]);
    for want in [
        "eu-office turn-udp: BLOCKED on the way",
        "eu-office turn-tls-proxy: TLS INSPECTED on the way",
        "eu-office turn-tcp: open",
    ] {
        assert!(comments.contains(want), "no {want:?} in:\n{comments}");
    }
}

/// The count of packets the probe says it wrote to its capture.
fn packets_written(output: &str) -> usize {
    output
        .lines()
        .find_map(|l| {
            l.strip_prefix("turnpike-probe: ")?
                .split_once(" packets written to ")
        })
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of packets written:\n{output}"))
}

/// tshark's output on a capture file.
fn tshark(file: &std::path::Path, args: &[&str]) -> String {
    let o = Command::new("tshark")
        .arg("-r")
        .arg(file)
        .args(args)
        .output()
        .expect("tshark (.ci/run installs it)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

//! Every verdict says only what was seen: against real relays, certificates made as operators
//! make them (openssl, a private CA), real proxies (tinyproxy, mitmproxy), services that are
//! not TURN relays, and, in network namespaces the tests make, a relay that is off, a firewall
//! that rejects and a machine with no route.

mod harness;

use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;

use harness::*;

/// Where nothing listens, something accepts and never answers, the relay refuses the
/// credentials, and a name does not resolve: each told apart, nothing called blocked.
#[test]
fn every_unreachable_path_says_why() {
    let cert = TestCert::new("probe-tls", &["turn.test", "127.0.0.1"]);
    // No UDP listener: UDP answers ICMP port unreachable.
    let tcp_only = relay_on(
        &["tcp://127.0.0.1:0", "tls://127.0.0.1:0"],
        Some(&cert),
        &[],
    );
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
    let regions = regions_file(
        &cert.dir,
        &[
            Region::new("tcp-only", "127.0.0.1")
                .set("udp_port", closed_udp)
                .set("tcp_port", tcp_only.addr_of("tcp").port())
                .tls(
                    tcp_only.addr_of("tls").port(),
                    "turn.test",
                    Some(&cert.cert),
                )
                .alice(),
            Region::new("wrong-password", "127.0.0.1")
                .set("udp_port", other.udp.port())
                .text("username", "alice")
                .text("password", "not-it"),
            Region::new("down", "127.0.0.1")
                .set("tcp_port", closed_tcp)
                .alice(),
            Region::new("nowhere", "relay.invalid")
                .set("udp_port", 3478)
                .alice(),
            Region::new("silent", "127.0.0.1")
                .set("tcp_port", silent_port)
                .alice(),
        ],
    );
    let (ok, report, out) = measure(&regions, &[]);
    assert!(ok, "{out}");
    assert_eq!(report["selected"], "tcp-only", "{report}");
    for p in ["turn-udp", "stun-udp"] {
        assert!(
            error(&report, "tcp-only", p).starts_with("refused"),
            "{report}"
        );
    }
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
        error(&report, "wrong-password", "turn-udp").starts_with("401"),
        "{report}"
    );
    assert_eq!(
        path(&report, "wrong-password", "stun-udp")["reachable"],
        true,
        "STUN needs no credentials"
    );
    assert!(error(&report, "down", "turn-tcp").starts_with("refused"));
    assert!(error(&report, "nowhere", "stun-udp").starts_with("dns"));

    // The firewall rows: a refusal says both of what it may be, and that the host is up
    // where another of its paths answered; one that accepts but does not speak TURN, a
    // relay that refused the credentials, a name that does not resolve, and the relay
    // ports, never tried where no UDP allocation was made.
    let refused = "REFUSED: nothing listens there, or a firewall rejects";
    assert_eq!(
        said(row(&report, "down", "TCP", "TURN")),
        (
            "refused".into(),
            format!("refused: TCP connect to 127.0.0.1:{closed_tcp}: connection refused")
        )
    );
    assert_eq!(
        said(row(&report, "silent", "TCP", "TURN")).0,
        "not_answering"
    );
    assert_eq!(
        said(row(&report, "wrong-password", "UDP", "STUN")).0,
        "relay_refused"
    );
    assert_eq!(said(row(&report, "nowhere", "UDP", "STUN")).0, "unknown");
    for region in ["tcp-only", "wrong-password", "nowhere"] {
        assert_eq!(
            said(relayed_row(&report, region)).0,
            "not_tested",
            "{region}"
        );
    }
    assert!(report["firewall"]
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r["destination"] == "127.0.0.1")
        .all(|r| r["addresses"] == serde_json::json!(["127.0.0.1"])));

    // The same for people, and the fixes of the HTML report.
    let html = cert.dir.join("report.html");
    let (_, table) = measure_text(
        &regions,
        &["--firewall", "--report", html.to_str().expect("path")],
    );
    assert!(table.contains("selected: tcp-only via turn-tcp"), "{table}");
    assert!(table.contains(refused), "{table}");
    assert!(
        table.contains("UNKNOWN: the name does not resolve: dns"),
        "{table}"
    );
    assert!(
        !table.contains("BLOCKED"),
        "nothing was blocked on the way:\n{table}"
    );
    assert!(
        table.contains("turnpike-probe: silent turn-tcp: probing"),
        "progress on stderr while the paths wait:\n{table}"
    );
    let page = std::fs::read_to_string(&html).expect("report");
    assert!(
        page.contains(&format!(
            "Nothing listens at 127.0.0.1 port {closed_udp}, or a firewall rejects connections to it: the two look the same from here (the host is up: it answered on TCP"
        )),
        "{page}"
    );
    drop(silent);
}

/// A certificate made by `openssl` as the README says, or as `openssl req -x509` makes one
/// by default (a CA), into `dir`: (cert, key).
fn openssl_cert(dir: &Path, name: &str, as_readme: bool) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    let mut c = Command::new("openssl");
    c.args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
    ])
    .args(["-nodes", "-days", "365", "-subj", "/CN=relay.test"])
    .args(["-addext", "subjectAltName=DNS:relay.test,IP:127.0.0.1"]);
    if as_readme {
        c.args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .args(["-addext", "keyUsage=digitalSignature"])
            .args(["-addext", "extendedKeyUsage=serverAuth"]);
    }
    let out = c
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (.ci/run installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// A private CA, an intermediate under it and a leaf for relay.test and 127.0.0.1 under that:
/// the root (PEM file), the leaf alone, the leaf with its intermediate, and the leaf's key.
fn private_chain(dir: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca = |name: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p
    };
    let root_key = KeyPair::generate().expect("key");
    let root = ca("Example Private Root")
        .self_signed(&root_key)
        .expect("root");
    let mid_key = KeyPair::generate().expect("key");
    let mid = ca("Example Private Intermediate")
        .signed_by(&mid_key, &root, &root_key)
        .expect("intermediate");
    let leaf_key = KeyPair::generate().expect("key");
    let leaf = CertificateParams::new(vec!["relay.test".to_owned(), "127.0.0.1".to_owned()])
        .expect("params")
        .signed_by(&leaf_key, &mid, &mid_key)
        .expect("leaf");
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    };
    (
        write("root.pem", root.pem()),
        write("leaf.pem", leaf.pem()),
        write("fullchain.pem", leaf.pem() + &mid.pem()),
        write("leaf.key", leaf_key.serialize_pem()),
    )
}

/// Certificates the probe does not trust, as operators make them: each is the relay's to fix,
/// said in words with the fix, and never called inspection. The README's certificate command
/// makes one the probe trusts as `ca_file`; so does a private CA given as `ca_file` with the
/// full chain served.
#[test]
fn certificates_not_trusted_here_are_the_relays_to_fix_never_inspection() {
    let dir = TestCert::new("probe-untrusted", &["unused"]);
    let (readme, readme_key) = openssl_cert(&dir.dir, "readme", true);
    let (ca_true, ca_true_key) = openssl_cert(&dir.dir, "ca-true", false);
    let (root, leaf, fullchain, leaf_key) = private_chain(&dir.dir);
    let relays = [
        tls_relay(&readme, &readme_key, &[]),
        tls_relay(&ca_true, &ca_true_key, &[]),
        tls_relay(&fullchain, &leaf_key, &[]),
        tls_relay(&leaf, &leaf_key, &[]),
    ];
    let tls = |i: usize| relays[i].addr_of("tls").port();
    let region = |name: &str, i: usize, ca: Option<&Path>| {
        Region::new(name, "127.0.0.1")
            .tls(tls(i), "relay.test", ca)
            .alice()
    };
    let regions = regions_file(
        &dir.dir,
        &[
            region("self-signed", 0, None),
            region("self-signed-trusted", 0, Some(&readme)),
            region("ca-true", 1, Some(&ca_true)),
            region("private-ca", 2, None),
            region("private-ca-trusted", 2, Some(&root)),
            region("no-intermediate", 3, Some(&root)),
        ],
    );
    let html = dir.dir.join("report.html");
    let (_, report, out) = measure(&regions, &["--report", html.to_str().expect("path")]);
    for ok in ["self-signed-trusted", "private-ca-trusted"] {
        assert_eq!(
            path(&report, ok, "turn-tls")["reachable"],
            true,
            "{ok}: {report}"
        );
    }
    for (region, words) in [
        ("self-signed", "is self-signed (\"CN=relay.test\")"),
        ("self-signed", "give the probe that certificate as ca_file"),
        ("ca-true", "is a CA certificate (basicConstraints CA:TRUE)"),
        ("ca-true", "basicConstraints=critical,CA:FALSE"),
        (
            "private-ca",
            "under a root this machine does not trust: a private CA",
        ),
        (
            "no-intermediate",
            "the relay sent no intermediate certificate",
        ),
        ("no-intermediate", "fullchain.pem"),
    ] {
        let e = error(&report, region, "turn-tls");
        assert!(
            e.starts_with("untrusted: ") && e.contains(words),
            "{region}: {e}"
        );
        assert!(
            !e.contains("Other(") && !e.contains("CaUsedAsEndEntity"),
            "raw text: {e}"
        );
        let (verdict, _) = said(row(&report, region, "TCP/TLS", "TURN"));
        assert_eq!(verdict, "untrusted", "{region}");
    }
    assert!(!out.contains("inspect"), "no inspection claimed:\n{out}");
    let page = std::fs::read_to_string(&html).expect("report");
    assert!(
        page.contains("REACHED, but the relay&#39;s certificate is not trusted here")
            && page.contains("For the operator of the relay at 127.0.0.1, not for the network")
            && !page.contains("bypass list"),
        "{page}"
    );
}

/// A real proxy that inspects TLS (mitmproxy, re-signing with its own CA): the probe names the
/// issuer it was shown and says what to ask for; with the relay's key pinned (`tls_spki`) it
/// tells inspection even where the proxy's CA is trusted, while the relay's own certificate,
/// not trusted by that CA, is the relay's certificate not being trusted, not inspection.
#[test]
fn a_proxy_that_inspects_tls_is_named_with_its_evidence() {
    let cert = TestCert::new("probe-mitm", &["turn.test", "127.0.0.1"]);
    let r = tls_relay(&cert.cert, &cert.key, &[]);
    let tls = r.addr_of("tls").port();
    let (_proxy, proxy_port, mitm_ca) = mitmproxy(&cert.dir);
    let pin = turnpike_probe::inspect::seen(&cert.der)
        .expect("parses")
        .spki;
    let regions = regions_file(
        &cert.dir,
        &[
            Region::new("trusting-relay", "127.0.0.1")
                .tls(tls, "turn.test", Some(&cert.cert))
                .alice(),
            Region::new("trusting-proxy", "127.0.0.1")
                .tls(tls, "turn.test", Some(&mitm_ca))
                .text("tls_spki", &pin)
                .alice(),
        ],
    );
    let proxy = format!("http://127.0.0.1:{proxy_port}");
    let (_, report, _) = measure(&regions, &["--proxy", &proxy]);
    // Directly, the relay's certificate: it works where its CA is trusted.
    assert_eq!(
        path(&report, "trusting-relay", "turn-tls")["reachable"],
        true,
        "{report}"
    );
    // Through the proxy: mitmproxy's CA, named, with the key the relay showed directly.
    let e = error(&report, "trusting-relay", "turn-tls-proxy");
    assert!(
        e.starts_with("tls-inspection:")
            && e.contains("mitmproxy")
            && e.contains(&pin)
            && e.contains("bypass list"),
        "{e}"
    );
    // The proxy's CA trusted (as a company installs it), the relay's key pinned: the proxy is
    // caught by the pin...
    let e = error(&report, "trusting-proxy", "turn-tls-proxy");
    assert!(
        e.starts_with("tls-inspection:") && e.contains("tls_spki") && e.contains("mitmproxy"),
        "{e}"
    );
    // ...and the relay's own certificate, which that CA did not sign, is the relay's to fix.
    let e = error(&report, "trusting-proxy", "turn-tls");
    assert!(
        e.starts_with("untrusted:") && e.contains("self-signed"),
        "{e}"
    );
    assert_eq!(
        said(row(&report, "trusting-relay", "HTTP CONNECT", "the same")).0,
        "inspected"
    );
}

/// A proxy that cannot be reached, one that refuses CONNECT, and one that takes it while no
/// relay answers behind it: three different things, each with its own fix.
#[test]
fn proxies_absent_refusing_and_with_nothing_behind_them_are_told_apart() {
    let cert = TestCert::new("probe-proxies", &["turn.test", "127.0.0.1"]);
    let r = tls_relay(&cert.cert, &cert.key, &[]);
    let tls = r.addr_of("tls").port();
    let closed = free_port();
    // Accepts, never speaks TLS.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_port = silent.local_addr().expect("addr").port();
    let (_proxy, proxy_port) = tinyproxy(&cert.dir, &[closed, silent_port]);
    let region = |name: &str, port: u16| {
        regions_file(
            &cert.dir,
            &[Region::new(name, "127.0.0.1")
                .tls(port, "turn.test", Some(&cert.cert))
                .alice()],
        )
    };
    let absent = format!("http://127.0.0.1:{}", free_port());
    let tiny = format!("http://127.0.0.1:{proxy_port}");
    for (name, port, proxy, verdict, words) in [
        (
            "absent",
            tls,
            &absent,
            "proxy_unreachable",
            "cannot be reached",
        ),
        (
            "refusing",
            tls,
            &tiny,
            "proxy_refused",
            "refused CONNECT to 127.0.0.1 port",
        ),
        (
            "nothing-behind",
            closed,
            &tiny,
            "behind_proxy",
            "no relay answered behind it",
        ),
        (
            "silent-behind",
            silent_port,
            &tiny,
            "behind_proxy",
            "no relay answered behind it",
        ),
    ] {
        let html = cert.dir.join(format!("{name}.html"));
        let (_, report, _) = measure(
            &region(name, port),
            &["--proxy", proxy, "--report", html.to_str().expect("path")],
        );
        let (v, detail) = said(row(&report, name, "HTTP CONNECT", "the same"));
        assert_eq!(v, verdict, "{name}: {detail}");
        let page = std::fs::read_to_string(&html).expect("report");
        assert!(page.contains(words), "{name}: no {words:?}:\n{page}");
        if name != "refusing" {
            assert!(
                !page.contains("Let the web proxy open connections")
                    && !page.contains("let it open connections"),
                "{name}: asks the proxy's owners for what it already does:\n{page}"
            );
        }
    }
    drop(silent);
}

/// What answers on the TURN port is something else: a UDP echo gives the request back, a web
/// server answers HTTP, a plain TCP TURN listener answers a TLS handshake in clear.
#[test]
fn something_else_on_the_turn_port_is_not_called_a_relay_refusing() {
    let cert = TestCert::new("probe-not-turn", &["turn.test", "127.0.0.1"]);
    let r = relay(&["--echo-udp", "127.0.0.1:0"]);
    let echo = r.addr_of("echo-udp").port();
    let web = TcpListener::bind("127.0.0.1:0").expect("bind");
    let web_port = web.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut c in web.incoming().flatten() {
            let mut buf = [0u8; 512];
            let _ = c.read(&mut buf);
            let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let regions = regions_file(
        &cert.dir,
        &[
            Region::new("echo", "127.0.0.1")
                .set("udp_port", echo)
                .alice(),
            Region::new("web", "127.0.0.1")
                .set("tcp_port", web_port)
                .alice(),
            Region::new("clear", "127.0.0.1")
                .tls(r.addr_of("tcp").port(), "turn.test", Some(&cert.cert))
                .alice(),
        ],
    );
    let (_, report, _) = measure(&regions, &[]);
    for (region, p, protocol, words) in [
        ("echo", "turn-udp", "UDP", "came back as it was sent"),
        (
            "web",
            "turn-tcp",
            "TCP",
            "a web server answered (HTTP/1.1 400 Bad Request)",
        ),
        ("clear", "turn-tls", "TCP/TLS", "does not speak TLS"),
    ] {
        let e = error(&report, region, p);
        assert!(
            e.starts_with("not-turn: ") && e.contains(words),
            "{region}: {e}"
        );
        let (v, _) = said(row(&report, region, protocol, ""));
        assert_eq!(v, "not_turn", "{region}");
    }
}

/// The relay ports row says which port was tried and calls the range open only for it; a
/// port outside the range the report names is flagged; a relay that refuses this machine as
/// a peer leaves the relay ports untested.
#[test]
fn the_relay_ports_row_says_what_was_tried() {
    let range = common::free_port_range(8);
    let ports = format!("{}-{}", range.start(), range.end());
    let elsewhere = relay(&["--relay-ports", &ports]);
    let default = relay(&[]);
    // The default peer policy: loopback is refused as a peer.
    let strict = Relay::start(&["--user", "alice:wonderland"]);
    let dir = TestCert::new("probe-relay-row", &["unused"]);
    let regions = regions_file(
        &dir.dir,
        &[
            Region::new("elsewhere", "127.0.0.1")
                .set("udp_port", elsewhere.udp.port())
                .alice(),
            Region::new("default", "127.0.0.1")
                .set("udp_port", default.udp.port())
                .alice(),
            Region::new("strict", "127.0.0.1")
                .set("udp_port", strict.udp.port())
                .alice(),
        ],
    );
    let (_, report, _) = measure(&regions, &[]);
    let row = relayed_row(&report, "elsewhere");
    let tried = path(&report, "elsewhere", "turn-udp")["peer"]["relayed"]
        .as_str()
        .expect("the port tried")
        .rsplit(':')
        .next()
        .expect("port")
        .to_owned();
    assert!(range.contains(&tried.parse().expect("a port")));
    let (v, detail) = said(row);
    assert_eq!(
        (v.as_str(), row["port"].as_str()),
        ("open", Some(tried.as_str()))
    );
    assert!(
        detail.contains(&format!("port {tried} tried"))
            && detail.contains("outside 49152-65535")
            && detail.contains("relay_ports"),
        "{detail}"
    );
    let row = relayed_row(&report, "default");
    let (v, detail) = said(row);
    assert_eq!(
        (v.as_str(), row["port"].as_str()),
        ("open", Some("49152-65535"))
    );
    assert!(
        detail.contains("tried: datagrams crossed")
            && detail.contains("the other ports of the range were not tried"),
        "{detail}"
    );
    let (v, detail) = said(relayed_row(&report, "strict"));
    assert_eq!(v, "not_tested", "{detail}");
    assert!(
        detail.contains("the relay's peer policy refuses 127.0.0.1:")
            && detail.contains("403")
            && detail.contains("no datagram was sent to the relay ports"),
        "{detail}"
    );
}

/// In network namespaces (tests/netns/probe-down.sh): a relay host that is off (nobody at the
/// address: every UDP path silent, TCP unreachable) is "no answer on any path", and the fixes
/// start with checking that it is up; a firewall that rejects is told as possibly that, with
/// the host up on its other port; a machine without a route to the relay has a local error.
/// Needs root (unshare) and iptables.
#[test]
fn a_relay_that_is_off_a_rejecting_firewall_and_no_route_are_told_apart() {
    let cert = TestCert::new("probe-down", &["10.99.0.1"]);
    let ran = in_netns(
        "probe-down.sh",
        &[
            common::relay_binary().to_str().expect("path"),
            env!("CARGO_BIN_EXE_turnpike-probe"),
            cert.cert.to_str().expect("path"),
            cert.key.to_str().expect("path"),
            cert.dir.to_str().expect("path"),
        ],
        180,
    );
    assert!(ran.contains("probe ran"), "{ran}");
    let read = |name: &str| std::fs::read_to_string(cert.dir.join(name)).unwrap_or_default();
    let (text, err) = (read("table.json"), read("probe.err"));
    let report: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}\n{err}"));
    for protocol in ["UDP", "TCP", "TCP/TLS"] {
        let (v, _) = said(row(&report, "off", protocol, ""));
        assert_eq!(v, "silent", "off {protocol}: {report}");
    }
    for protocol in ["UDP", "TCP"] {
        let (v, _) = said(row(&report, "rejecting", protocol, ""));
        assert_eq!(v, "refused", "rejecting {protocol}: {report}");
    }
    assert_eq!(said(row(&report, "rejecting", "TCP/TLS", "")).0, "open");
    let (v, detail) = said(row(&report, "unrouted", "TCP", ""));
    assert_eq!(v, "local", "{detail}");
    assert!(detail.contains("no route"), "{detail}");
    let page = read("report.html");
    let first = page
        .split("<ul id=\"fixes\"><li>")
        .nth(1)
        .unwrap_or_else(|| panic!("no fixes:\n{page}"));
    assert!(
        first.starts_with("Check first that the relay at 10.99.0.7 is up (ask its operator)"),
        "{page}"
    );
    assert!(
        page.contains("NO ANSWER from the host on any path: the relay is down, or everything to it is blocked"),
        "{page}"
    );
    assert!(
        page.contains("Nothing listens at 10.99.0.1 port 3478, or a firewall rejects connections to it: the two look the same from here (the host is up: it answered on TLS 443)"),
        "{page}"
    );
    assert!(page.contains("LOCAL ERROR on this machine"), "{page}");
    assert!(
        !page.contains("Allow UDP from this network to 10.99.0.7"),
        "no firewall opening asked for a relay that may be off:\n{page}"
    );
}

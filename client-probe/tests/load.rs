//! `turnpike-probe load` against a real relay on loopback: every transport in both modes,
//! Send indications with ephemeral credentials, a refused password, and the bounds.

#[path = "../../server/tests/common/mod.rs"]
mod common;

use std::process::Command;

use common::{Relay, TestCert};

const SECRET: &str = "load-secret";

fn relay(cert: &TestCert) -> Relay {
    Relay::with_streams(cert, &["--auth-secret", SECRET])
}

/// Runs the load generator (killed after 60 s); exit success, stdout, stderr.
fn load(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("timeout")
        .arg("60")
        .arg(env!("CARGO_BIN_EXE_turnpike-probe"))
        .arg("load")
        .args(args)
        .output()
        .expect("run turnpike-probe load");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn report(stdout: &str) -> serde_json::Value {
    let line = stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON in:\n{stdout}"));
    serde_json::from_str(line).expect("one JSON document")
}

/// 4 allocations at 200 packets/s for 2 s: everything sent comes back, with sane figures.
fn check_clean_run(relay_addr: &str, transport: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "--relay",
        relay_addr,
        "--transport",
        transport,
        "--allocations",
        "4",
        "--rate",
        "200",
        "--duration",
        "2",
        "--size",
        "120",
        "--json",
    ];
    args.extend_from_slice(extra);
    let (ok, out, err) = load(&args);
    assert!(ok, "{transport} {extra:?}: failed\n{out}\n{err}");
    let r = report(&out);
    let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} in {r}"));
    let what = format!("{transport} {extra:?}: {r}");
    // 4 flows x 200/s x 2 s, less at most one tick of pacing per flow.
    assert!((1550..=1604).contains(&n("sent")), "{what}");
    assert_eq!(n("received"), n("sent"), "{what}");
    assert_eq!(n("lost"), 0, "{what}");
    assert_eq!(n("duplicates"), 0, "{what}");
    assert_eq!(r["setup"]["allocations"], 4, "{what}");
    let per_echo = if r["mode"] == "c2c" { 4 } else { 2 };
    assert_eq!(n("relayed"), per_echo * n("received"), "{what}");
    let rtt = &r["rtt_ms"];
    let ms = |k: &str| rtt[k].as_f64().unwrap_or_else(|| panic!("rtt {k} in {r}"));
    assert!(ms("p50") > 0.0, "{what}");
    assert!(ms("p50") <= ms("p90"), "{what}");
    assert!(ms("p90") <= ms("p99"), "{what}");
    assert!(ms("p99") <= ms("max"), "{what}");
    // Loopback through a relay: well under a second even on a loaded machine.
    assert!(ms("max") < 1000.0, "{what}");
    // RFC 3550 jitter smooths the differences of consecutive transit times, each at most the
    // spread of the round trips, and so at most the largest; echoes through a relay vary.
    let jitter = r["jitter_ms"].as_f64().unwrap_or(f64::NAN);
    assert!(jitter > 0.0 && jitter <= ms("max"), "{what}");
    r
}

fn every_transport(mode: &str) {
    let cert = TestCert::new("load", &["turn.test", "127.0.0.1"]);
    let relay = relay(&cert);
    let cred = [
        "--user",
        "alice",
        "--password",
        "wonderland",
        "--mode",
        mode,
    ];
    for (transport, addr) in [
        ("udp", relay.udp),
        ("tcp", relay.addr_of("tcp")),
        ("tls", relay.addr_of("tls")),
    ] {
        let mut extra = cred.to_vec();
        if transport == "tls" {
            extra.push("--insecure");
        }
        let r = check_clean_run(&addr.to_string(), transport, &extra);
        assert_eq!(r["transport"], transport);
        assert_eq!(r["mode"], mode);
        assert_eq!(r["framing"], "channel");
    }
}

#[test]
fn channels_to_peers_over_udp_tcp_and_tls() {
    every_transport("peer");
}

#[test]
fn channels_client_to_client_over_udp_tcp_and_tls() {
    every_transport("c2c");
}

#[test]
fn send_indications_with_ephemeral_credentials() {
    let cert = TestCert::new("load-send", &["127.0.0.1"]);
    let relay = relay(&cert);
    for (transport, mode) in [("udp", "peer"), ("udp", "c2c"), ("tcp", "peer")] {
        let addr = if transport == "udp" {
            relay.udp
        } else {
            relay.addr_of("tcp")
        };
        let r = check_clean_run(
            &addr.to_string(),
            transport,
            &["--secret", SECRET, "--send-indications", "--mode", mode],
        );
        assert_eq!(r["framing"], "send-indication");
    }
}

#[test]
fn a_wrong_password_fails_with_the_reason() {
    let cert = TestCert::new("load-401", &["127.0.0.1"]);
    let relay = relay(&cert);
    let addr = relay.udp.to_string();
    let (ok, out, err) = load(&[
        "--relay",
        &addr,
        "--user",
        "alice",
        "--password",
        "not-it",
        "--duration",
        "1",
        "--json",
    ]);
    assert!(!ok, "a refused allocation must fail the run:\n{out}\n{err}");
    assert!(err.contains("401"), "{err}");
    let r = report(&out);
    assert!(
        r["failure"].as_str().is_some_and(|f| f.starts_with("401")),
        "{r}"
    );
    // A shared secret the relay does not know is refused the same way.
    let (ok, _, err) = load(&["--relay", &addr, "--secret", "other", "--duration", "1"]);
    assert!(!ok && err.contains("401"), "{err}");
}

#[test]
fn duration_size_and_count_are_bounded() {
    for (flag, value) in [
        ("--duration", "3601"),
        ("--size", "8"),
        ("--allocations", "0"),
        ("--allocations", "20001"),
        ("--rate", "1000000"),
    ] {
        let (ok, _, err) = load(&[
            "--relay",
            "127.0.0.1:9",
            "--user",
            "a",
            "--password",
            "b",
            flag,
            value,
        ]);
        assert!(!ok, "{flag} {value} accepted");
        assert!(err.contains(flag), "{flag} {value}: {err}");
    }
    let (ok, _, err) = load(&[
        "--relay",
        "127.0.0.1:9",
        "--user",
        "a",
        "--password",
        "b",
        "--mode",
        "c2c",
        "--allocations",
        "3",
    ]);
    assert!(!ok && err.contains("even"), "{err}");
}

/// A relay that answers one stranger's request a second (burst 2) still sets up a hundred
/// allocations at once: the generator signs with the nonce its first allocation learnt
/// rather than asking for a 401 per allocation.
#[test]
fn many_allocations_from_one_address_need_few_401s() {
    let config = common::ConfigFile::new(
        "load-nonce",
        "[auth]\nunauthenticated_replies_per_sec = 1.0\n",
    );
    let relay = Relay::start(&[
        "--config",
        config.arg(),
        "--allow-peer",
        "127.0.0.0/8",
        "--user",
        "alice:wonderland",
    ]);
    let (ok, out, err) = load(&[
        "--relay",
        &relay.udp.to_string(),
        "--user",
        "alice",
        "--password",
        "wonderland",
        "--allocations",
        "100",
        "--setup-concurrency",
        "2",
        "--rate",
        "10",
        "--duration",
        "1",
        "--timeout-ms",
        "3000",
        "--json",
    ]);
    assert!(ok, "failed\n{out}\n{err}");
    let r = report(&out);
    assert_eq!(r["setup"]["allocations"], 100, "{r}");
    assert_eq!(r["lost"], 0, "{r}");
}

/// `--peer-per-allocation` gives every allocation a generator peer of its own (a relay that
/// multiplexes relayed addresses on one port refuses a peer address another allocation has
/// bound); without it a few peers are shared. Traffic still all comes back.
#[test]
fn a_peer_per_allocation_on_request() {
    let cert = TestCert::new("load-peers", &["127.0.0.1"]);
    let relay = relay(&cert);
    let addr = relay.udp.to_string();
    let cred = [
        "--user",
        "alice",
        "--password",
        "wonderland",
        "--threads",
        "1",
    ];
    let shared = check_clean_run(&addr, "udp", &cred);
    assert_eq!(shared["peers"], 2, "{shared}");
    let mut extra = cred.to_vec();
    extra.push("--peer-per-allocation");
    let own = check_clean_run(&addr, "udp", &extra);
    assert_eq!(own["peers"], 4, "{own}");
    assert_eq!(own["mode"], "peer", "{own}");
    // Client to client has no generator peers to give out.
    extra.extend_from_slice(&["--mode", "c2c"]);
    let (ok, _, err) = load(&{
        let mut a = vec!["--relay", &addr, "--allocations", "4", "--duration", "1"];
        a.extend_from_slice(&extra);
        a
    });
    assert!(!ok && err.contains("--peer-per-allocation"), "{err}");
}

/// A setup that fails names the request that failed and what it most likely means: the
/// relay's connections per address over TCP and TLS, and a peer endpoint another allocation
/// holds on shared relay ports. The table reads as people write rates and modes.
#[test]
fn a_failed_setup_names_its_request_and_likely_cause() {
    let cert = TestCert::new("load-why", &["127.0.0.1"]);
    let relay = relay(&cert);
    let cred = ["--user", "alice", "--password", "wonderland"];
    for scheme in ["tcp", "tls"] {
        let addr = relay.addr_of(scheme).to_string();
        let mut args = vec![
            "--relay",
            &addr,
            "--transport",
            scheme,
            "--insecure",
            "--allocations",
            "70",
            "--rate",
            "10",
            "--duration",
            "1",
        ];
        args.extend_from_slice(&cred);
        let (ok, out, err) = load(&args);
        assert!(
            !ok,
            "{scheme}: 70 connections from one address:\n{out}\n{err}"
        );
        assert!(
            err.contains("64 connections were accepted first")
                && err.contains("tcp.max_connections_per_ip"),
            "{scheme}: {err}"
        );
        let step = err
            .split(": ")
            .nth(2)
            .unwrap_or_else(|| panic!("{scheme}: {err}"));
        assert!(
            [
                "TCP connect failed",
                "TLS handshake failed",
                "Allocate failed"
            ]
            .contains(&step),
            "{scheme}: the request is named: {err}"
        );
    }

    let shared = Relay::start(&[
        "--allow-peer",
        "127.0.0.0/8",
        "--user",
        "alice:wonderland",
        "--shared-relay-ports",
        "2",
    ]);
    let addr = shared.udp.to_string();
    let mut args = vec!["--relay", &addr, "--allocations", "40", "--duration", "1"];
    args.extend_from_slice(&cred);
    let (ok, out, err) = load(&args);
    assert!(!ok, "{out}\n{err}");
    assert!(
        err.contains("ChannelBind failed: 403 Forbidden")
            && err.contains("bound the same peer first")
            && err.contains("--peer-per-allocation"),
        "{err}"
    );
    args.push("--peer-per-allocation");
    args.extend_from_slice(&["--rate", "363.372"]);
    let (ok, out, err) = load(&args);
    assert!(ok, "a peer each:\n{out}\n{err}");
    assert!(
        out.contains(
            "40 allocations over UDP, to the generator's peers, channel, 363.4 pkt/s each"
        ),
        "{out}"
    );
}

//! The browser network test page, run by headless Chromium (fake camera and microphone) in a
//! network namespace the test creates: every path works against a full relay; with the UDP
//! listener off, the report marks UDP blocked and says what to open; with the relay's
//! certificate accepted for the page only (a visitor who clicked through the warning), TURN
//! over TLS is the relay's certificate not trusted, by the alert the browser sent the relay;
//! behind a proxy that re-signs TLS and passes only web traffic, it marks TLS inspected, by the
//! ClientHello the relay saw for the page; the page's statistics and call-quality score are
//! the probe's, on the same samples; the speaker question waits for the tone; the page loads
//! nothing from anywhere but the relay; the downloaded report is the page's; the screenshot
//! shows a green badge for each working path and a red one for the blocked path. Needs root
//! (unshare), Debian's chromium and `npm ci` in tests/browser (.ci/run does both).

mod common;

use common::{run_tool, TestCert};
use serde_json::Value;
use turnpike_proto::advice::Phrase;

fn load(dir: &std::path::Path, name: &str) -> Value {
    let text = std::fs::read_to_string(dir.join(format!("{name}.json")))
        .unwrap_or_else(|e| panic!("{name}.json: {e}"));
    serde_json::from_str(&text).expect("json")
}

/// The probe's voice-call score for round-trip samples and a loss ratio: its statistics and
/// its model, the ones the page must match.
fn probe_score(samples: &[f64], loss: f64) -> turnpike_probe::quality::Voice {
    let median = turnpike_probe::select::rtt(samples).map_or(0.0, |r| r.median);
    let jitter = turnpike_probe::select::jitter(samples).unwrap_or(0.0);
    turnpike_probe::quality::voice(median, jitter, loss)
}

fn paths(run: &Value) -> Vec<&Value> {
    run["report"]["paths"]
        .as_array()
        .expect("paths")
        .iter()
        .collect()
}

/// Green for OK, amber for WARNING, red for BLOCKED, as the page's stylesheet paints them.
fn colour_matches(verdict: &str, rgb: &[Value]) -> bool {
    let c: Vec<i64> = rgb.iter().map(|v| v.as_i64().unwrap_or(-1)).collect();
    let near = |want: [i64; 3]| c.iter().zip(want).all(|(a, b)| (a - b).abs() <= 24);
    match verdict {
        "ok" => near([0x1a, 0x7f, 0x37]),
        "fail" => near([0xcf, 0x22, 0x2e]),
        "warn" => near([0x9a, 0x67, 0x00]),
        _ => near([0x6e, 0x77, 0x81]),
    }
}

fn check_common(run: &Value, name: &str) {
    let report = &run["report"];
    assert_eq!(report["done"], true, "{name}: {report}");
    assert_eq!(
        run["downloaded"], *report,
        "{name}: the downloaded report is the page's"
    );
    assert!(
        report["session"].get("credential").is_none(),
        "{name}: no credential in the report"
    );
    // Everything the page loaded came from the relay (its TLS ports on 10.99.0.1).
    for url in run["requests"].as_array().expect("requests") {
        let url = url.as_str().expect("url");
        assert!(
            url.starts_with("https://10.99.0.1/")
                || url.starts_with("https://10.99.0.1:5349/")
                || url.starts_with("wss://10.99.0.1/"),
            "{name}: the page loaded {url}"
        );
    }
    let badges = run["badges"].as_array().expect("badges");
    assert!(!badges.is_empty(), "{name}: badges in the screenshot");
    for b in badges {
        let verdict = b["verdict"].as_str().expect("verdict");
        assert!(
            colour_matches(verdict, b["rgb"].as_array().expect("rgb")),
            "{name}: badge {b} does not show its verdict in the screenshot"
        );
    }
}

#[test]
fn chromium_runs_the_network_test_page_and_gets_verdicts() {
    let cert = TestCert::new("testpage", &["10.99.0.1", "127.0.0.1"]);
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    for module in ["playwright-core", "pngjs"] {
        assert!(
            std::path::Path::new(&format!("{root}/tests/browser/node_modules/{module}")).exists(),
            "run `npm ci` in tests/browser (.ci/run does)"
        );
    }
    let out = run_tool(
        "unshare",
        &[
            "--net",
            "--fork",
            &format!("{root}/tests/browser/test-page-in-netns.sh"),
            env!("CARGO_BIN_EXE_turnpike"),
            cert.cert.to_str().expect("path"),
            cert.key.to_str().expect("path"),
            cert.dir.to_str().expect("path"),
        ],
        300,
    );
    assert!(out.contains("inspect: done"), "{out}");

    let full = load(&cert.dir, "full");
    check_common(&full, "full");
    let report = &full["report"];
    assert_eq!(report["verdict"], "ok", "{report}");
    assert_eq!(report["summary"], "Every path to 10.99.0.1 works.");
    let ps = paths(&full);
    assert_eq!(
        ps.iter()
            .map(|p| p["id"].as_str().unwrap_or(""))
            .collect::<Vec<_>>(),
        ["udp-3478", "tcp-3478", "tls-443"]
    );
    for p in &ps {
        let transport = p["transport"].as_str().expect("transport");
        assert_eq!(p["ok"], true, "{p}");
        assert_eq!(p["candidate"]["type"], "relay", "{p}");
        assert_eq!(p["candidate"]["relayProtocol"], transport, "{p}");
        assert!(p["rtt_ms"]["median"].as_f64().expect("rtt") > 0.0, "{p}");
        assert!(p["setup_ms"].as_f64().expect("setup") > 0.0, "{p}");
        assert!(p["loss"].as_f64().expect("loss") <= 0.02, "{p}");
        assert!(
            p["throughput_mbps"].as_f64().expect("throughput") >= 1.0,
            "{p}"
        );
        assert_eq!(p["verdict"], "ok", "{p}");
        // The throughput against the requirement, in the probe's words, and the call quality
        // by the probe's model from the page's own figures.
        assert_eq!(p["meets"], true, "{p}");
        let message = p["message"].as_str().expect("message");
        assert!(
            message.contains("Mbit/s: meets the requirement (video up to"),
            "{message}"
        );
        // The probe's score on this path's own samples (as the page measured them).
        let mos = p["voice"]["mos"].as_f64().expect("mos");
        let samples: Vec<f64> = p["rtt_samples"]
            .as_array()
            .expect("samples")
            .iter()
            .map(|v| v.as_f64().expect("a sample"))
            .collect();
        let probe = probe_score(&samples, p["loss"].as_f64().expect("loss"));
        assert!(
            (mos - probe.mos).abs() <= 0.005 && p["voice"]["rating"] == probe.rating,
            "{p}"
        );
        assert!(message.contains(&format!("MOS {mos}")), "{message}");
        assert!(p["video"].is_string(), "{p}");
    }
    assert_eq!(report["websocket"]["ok"], true, "{report}");
    assert_eq!(report["long_poll"]["ok"], true, "{report}");
    assert_eq!(
        report["media"]["ok"], true,
        "fake camera and microphone: {report}"
    );
    // The resolutions the (fake) camera offers, and the browser with its version.
    let media = &report["media"];
    assert!(
        media["camera_max"]
            .as_str()
            .is_some_and(|m| m.contains('x'))
            && media["camera_resolutions"]
                .as_array()
                .is_some_and(|r| r.iter().any(|x| x == "360p")),
        "{media}"
    );
    assert!(
        media["message"]
            .as_str()
            .is_some_and(|m| m.contains("the camera sends up to")),
        "{media}"
    );
    assert_eq!(report["browser"]["name"], "Chrome", "{report}");
    // The speaker test: no answer taken before the tone; the tone reached the output (its
    // level measured on the way) and the visitor's answer is recorded.
    assert_eq!(
        full["speaker"]["answer_disabled_before_tone"], true,
        "{full}"
    );
    let speaker = &report["speaker"];
    assert_eq!(speaker["played"], true, "{speaker}");
    assert!(
        speaker["level"].as_f64().is_some_and(|l| l > 0.05),
        "{speaker}"
    );
    assert_eq!(speaker["heard"], true, "{speaker}");
    // The page's statistics and score are the probe's, on the same samples.
    for m in full["model"].as_array().expect("model") {
        let xs: Vec<f64> = m["xs"]
            .as_array()
            .expect("xs")
            .iter()
            .map(|v| v.as_f64().expect("x"))
            .collect();
        let rtt = turnpike_probe::select::rtt(&xs).expect("stats");
        assert_eq!(m["stats"]["median"].as_f64(), Some(rtt.median), "{m}");
        assert_eq!(m["stats"]["p95"].as_f64(), Some(rtt.p95), "{m}");
        assert_eq!(
            m["jitter"].as_f64(),
            turnpike_probe::select::jitter(&xs),
            "{m}"
        );
        let probe = probe_score(&xs, m["loss"].as_f64().expect("loss"));
        assert!(
            (m["voice"]["mos"].as_f64().expect("mos") - probe.mos).abs() <= 0.005,
            "{m}: the probe says {probe:?}"
        );
    }
    assert!(
        report["browser"]["version"]
            .as_str()
            .is_some_and(|v| v.contains('.')),
        "{report}"
    );
    let regions = report["regions"].as_array().expect("regions");
    assert_eq!(regions.len(), 2);
    assert!(
        regions.iter().all(|r| r["reachable"] == true),
        "{regions:?}"
    );
    assert_eq!(
        regions.iter().filter(|r| r["nearest"] == true).count(),
        1,
        "one nearest relay: {regions:?}"
    );

    let noudp = load(&cert.dir, "noudp");
    check_common(&noudp, "noudp");
    let report = &noudp["report"];
    assert_eq!(report["verdict"], "warn", "{report}");
    let ps = paths(&noudp);
    let udp = ps[0];
    assert_eq!(
        (udp["transport"].as_str(), udp["ok"].as_bool()),
        (Some("udp"), Some(false))
    );
    assert_eq!(udp["verdict"], "fail");
    // The probe's words (one table, turnpike_proto::advice), filled in by the page.
    assert_eq!(
        udp["message"],
        format!("TURN over UDP to port 3478: {}.", Phrase::Blocked.text())
    );
    let advice = udp["advice"].as_str().expect("advice");
    let fix = Phrase::FixUdp.say(&[("host", "10.99.0.1"), ("port", "3478")]);
    assert!(
        advice.starts_with(&format!(
            "{fix} Until then calls use TCP on port 3478 (measured here: "
        )),
        "{advice}"
    );
    // The other paths work, but below the (deliberately unreachable) 1000 Mbit/s threshold.
    for p in &ps[1..] {
        assert_eq!(
            (p["ok"].as_bool(), p["verdict"].as_str()),
            (Some(true), Some("warn")),
            "{p}"
        );
        let advice = p["advice"].as_str().expect("advice");
        assert!(
            advice.contains("below the 1000 Mbit/s video calls need"),
            "{advice}"
        );
    }
    assert_eq!(
        report["summary"],
        "Calls will work, over TCP 3478, TLS 443 only. See below for what to open."
    );
    let red = noudp["badges"]
        .as_array()
        .expect("badges")
        .iter()
        .filter(|b| b["verdict"] == "fail")
        .count();
    assert_eq!(red, 1, "one red badge, for UDP");
    let amber = noudp["badges"]
        .as_array()
        .expect("badges")
        .iter()
        .filter(|b| b["verdict"] == "warn")
        .count();
    assert_eq!(amber, 2, "amber badges for the slow paths");

    // The relay's self-signed certificate accepted for the page only: TURN over TLS is
    // refused by the browser, which told the relay so (an alert): the relay's certificate, not
    // inspection, not the network. UDP and TCP carry calls, at the test's own rate limit.
    let clicked = load(&cert.dir, "clicked");
    check_common(&clicked, "clicked");
    let report = &clicked["report"];
    assert_eq!(report["verdict"], "warn", "{report}");
    let ps = paths(&clicked);
    let tls = ps[2];
    assert_eq!(
        (tls["ok"].as_bool(), tls["untrusted"].as_bool()),
        (Some(false), Some(true)),
        "{tls}"
    );
    assert!(tls["inspected"].is_null(), "{tls}");
    let message = tls["message"].as_str().expect("message");
    assert!(
        message.starts_with(&format!(
            "TURN over TLS to port 443: {} (this browser ended the TLS handshake with the alert ",
            Phrase::Untrusted.text()
        )),
        "{message}"
    );
    let advice = tls["advice"].as_str().expect("advice");
    assert!(
        advice.starts_with("For the operator of the relay at 10.99.0.1, not for the network: this browser does not trust the relay's certificate")
            && advice.contains("Until then calls use UDP on port 3478"),
        "{advice}"
    );
    for p in &ps[..2] {
        assert_eq!(p["ok"], true, "{p}");
        // The rate kept up, at most the limit (2 Mbit/s) and a little: not its first burst.
        let rate = p["throughput_mbps"].as_f64().expect("rate");
        assert!(rate <= 2.3, "{p}");
    }
    assert_eq!(
        ps[0]["at_test_limit"], true,
        "UDP reaches the limit: {}",
        ps[0]
    );
    // The figures name the limit they reached, not the rate as if it were the limit.
    let figures = clicked["figures"].as_array().expect("figures");
    assert_eq!(figures.len(), 2, "{figures:?}");
    for (f, p) in figures.iter().zip(&ps[..2]) {
        let f = f.as_str().expect("text");
        let label = format!(
            "{} Mbit/s, at the test's limit of 2 Mbit/s (the path may carry more)",
            p["throughput_mbps"]
        );
        assert_eq!(f.contains(&label), p["at_test_limit"] == true, "{f}");
    }

    // Behind a proxy that re-signs TLS and passes only web traffic: the page loaded through
    // it, TURN over TLS did not pass, and the relay saw the page's own HTTPS arrive from a
    // TLS client that is not Chromium (no GREASE): that is the evidence the page names.
    let inspect = load(&cert.dir, "inspect");
    check_common(&inspect, "inspect");
    let report = &inspect["report"];
    assert_eq!(report["verdict"], "fail", "{report}");
    let ps = paths(&inspect);
    assert_eq!(ps.len(), 1, "{report}");
    let tls = ps[0];
    assert_eq!(
        (
            tls["ok"].as_bool(),
            tls["tls_seen"]["grease"].as_bool(),
            tls["verdict"].as_str()
        ),
        (Some(false), Some(false), Some("fail")),
        "{tls}"
    );
    assert_eq!(
        tls["message"],
        format!(
            "TURN over TLS to port 443: {} (this page's HTTPS reached the relay from a TLS client that is not Chrome).",
            Phrase::Inspected.text()
        )
    );
    assert_eq!(
        tls["advice"],
        format!(
            "{} {}",
            Phrase::FixInspectedWeb.say(&[
                ("host", "10.99.0.1"),
                ("port", "443"),
                (
                    "detail",
                    "its ClientHello offered no GREASE, which Chrome always sends"
                )
            ]),
            Phrase::NoFallback.text()
        )
    );
    // Directly (the full run), Chromium's own ClientHello is seen: no inspection claimed.
    assert!(load(&cert.dir, "full")["report"]["paths"][2]["inspected"].is_null());
    assert_eq!(
        report["websocket"]["ok"], true,
        "web traffic passes: {report}"
    );
}

/// The page's credentials are good for the test only: they reach this relay's own allocations
/// and nothing else, even where the operator allows loopback peers, and sessions are rate
/// limited per source.
#[test]
fn test_page_credentials_relay_only_between_this_relays_allocations() {
    use common::{RawClient, Relay};
    use turnpike_proto::stun::{attr, method};
    let cert = TestCert::new("testpage-creds", &["127.0.0.1"]);
    let file = cert.dir.join("relay.toml");
    std::fs::write(
        &file,
        format!(
            "listen = [\"udp://127.0.0.1:0\", \"tls://127.0.0.1:0\"]\nrelay_ips = [\"127.0.0.1\"]\n\
             [tls]\ncert = {:?}\nkey = {:?}\n[peer]\nallow = [\"127.0.0.0/8\"]\n[test_page]\nenabled = true\n",
            cert.cert.display().to_string(),
            cert.key.display().to_string()
        ),
    )
    .expect("config");
    let relay = Relay::spawn(&[
        "--config",
        file.to_str().expect("path"),
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let tls = relay.addr_of("tls");
    let session = || {
        let out = std::process::Command::new("curl")
            .args(["-sk", "-w", "\n%{http_code}", "-X", "POST"])
            .arg(format!("https://127.0.0.1:{}/test/session", tls.port()))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').expect("status");
        (code.trim().to_owned(), body.to_owned())
    };
    let (code, body) = session();
    assert_eq!(code, "200", "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["ttl"], 300);
    let (user, pass) = (
        v["username"].as_str().expect("username"),
        v["credential"].as_str().expect("credential"),
    );
    assert_eq!(
        v["paths"][0]["url"],
        format!("turn:127.0.0.1:{}?transport=udp", relay.udp.port())
    );

    let mut a = RawClient::new(relay.udp, user, pass);
    let r = a.allocate();
    assert_eq!(r.code(), None, "test credentials allocate");
    let relayed_a = r.xor_addrs(attr::XOR_RELAYED_ADDRESS)[0];
    let mut b = RawClient::new(relay.udp, user, pass);
    let relayed_b = b.allocate().xor_addrs(attr::XOR_RELAYED_ADDRESS)[0];
    assert_ne!(relayed_a, relayed_b);
    let permit = |c: &mut RawClient, peer: std::net::SocketAddr| {
        c.request(method::CREATE_PERMISSION, |m| {
            m.xor_address(attr::XOR_PEER_ADDRESS, peer);
        })
        .code()
    };
    // Another allocation of this relay: allowed (that is the test).
    assert_eq!(permit(&mut a, relayed_b), None);
    // Another test's allocation (another session's credentials) is refused too: two visitors
    // cannot join their tests into a relay. Sessions a second apart get other usernames.
    let unix = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
    };
    let first = unix();
    while unix() == first {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (code, body) = session();
    assert_eq!(code, "200", "{body}");
    let v2: Value = serde_json::from_str(&body).expect("json");
    assert_ne!(v2["username"], v["username"]);
    let mut other = RawClient::new(
        relay.udp,
        v2["username"].as_str().expect("username"),
        v2["credential"].as_str().expect("credential"),
    );
    let relayed_other = other.allocate().xor_addrs(attr::XOR_RELAYED_ADDRESS)[0];
    assert_eq!(permit(&mut a, relayed_other), Some(403), "another session");
    assert_eq!(permit(&mut other, relayed_a), Some(403), "another session");
    // The allocation lives no longer than the credentials.
    let r = a.request(method::REFRESH, |m| {
        m.u32(attr::LIFETIME, 3600);
    });
    assert_eq!(r.msg().get_u32(attr::LIFETIME), Some(300));
    // Anything else, even loopback which the operator allows for other tenants: refused.
    let outside = std::net::UdpSocket::bind("127.0.0.1:0").expect("peer");
    assert_eq!(
        permit(&mut a, outside.local_addr().expect("addr")),
        Some(403)
    );
    assert_eq!(
        permit(&mut a, "198.51.100.7:5000".parse().expect("addr")),
        Some(403)
    );
    // The operator's own users keep the operator's policy.
    assert!(relay.wait_metric("turnpike_peer_denied_total{tenant=\"test-page\"}", 4.0) >= 4.0);
    // Over plain HTTP the page is refused.
    let plain = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://127.0.0.1:{}/test", tls.port()))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&plain.stdout), "403");

    // Sessions are rate limited per source: a burst, then 429.
    let codes: Vec<String> = (0..8).map(|_| session().0).collect();
    assert!(codes.iter().any(|c| c == "429"), "{codes:?}");
}

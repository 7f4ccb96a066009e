//! What IT is handed, checked as IT reads it: the HTML report (rendered by headless
//! Chromium), the capture file (read by tshark), the bandwidth figures against a stated
//! requirement, and the office behind a UDP-dropping firewall and a TLS-inspecting proxy
//! (network namespaces the tests make).

mod harness;

use std::path::Path;
use std::process::Command;

use harness::*;

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
    let regions = regions_file(
        &cert.dir,
        &[
            Region::new("local", "127.0.0.1")
                .set("udp_port", r.udp.port())
                .set("tcp_port", r.addr_of("tcp").port())
                .tls(r.addr_of("tls").port(), "turn.test", Some(&cert.cert))
                .alice(),
            Region::new("down", "127.0.0.1")
                .set("udp_port", closed_udp)
                .alice(),
        ],
    );
    let file = cert.dir.join("probe.pcapng");
    let (_, out) = measure_text(
        &regions,
        &["--samples", "3", "--capture", file.to_str().expect("path")],
    );
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
        (
            "down stun-udp",
            "REFUSED: nothing listens there, or a firewall rejects",
        ),
    ] {
        assert!(
            comments
                .lines()
                .any(|l| l.starts_with(&format!("{path}\t{path}: {verdict}"))),
            "no comment for {path}: {verdict}:\n{comments}"
        );
    }
    // Packets in time order across the paths (Wireshark's own order), and every path's
    // verdict in the file, those of paths that sent nothing too (the down region's TURN).
    let times: Vec<f64> = tshark(&["-T", "fields", "-e", "frame.time_epoch"])
        .lines()
        .map(|t| t.trim().parse().expect("a time"))
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "out of time order");
    let interfaces = tshark(&[
        "-Y",
        "frame.number == 1",
        "-T",
        "fields",
        "-e",
        "frame.interface_name",
    ]);
    assert!(!interfaces.trim().is_empty());
    let info = Command::new("capinfos")
        .arg(&file)
        .output()
        .expect("capinfos (tshark's)");
    let info = String::from_utf8_lossy(&info.stdout);
    for want in [
        "down turn-udp: REFUSED: nothing listens there, or a firewall rejects",
        "local turn-tls: open",
    ] {
        assert!(
            info.contains(want),
            "the file's comment lacks {want:?}:\n{info}"
        );
    }
}

/// `--bandwidth`: a relay that carries the rate meets the requirement over UDP and TCP; one
/// whose per-allocation quota is below it does not, gives the rate it keeps up (not its burst)
/// and says the relay's quota is the limit, as the relay told it (its BANDWIDTH attribute).
#[test]
fn bandwidth_through_the_relay_meets_or_misses_the_requirement() {
    let open = relay(&[]);
    // 250,000 bytes a second per allocation: 2 Mbit/s.
    let limited = relay(&["--max-bps", "250000"]);
    let cert = TestCert::new("probe-bandwidth", &["unused"]);
    let regions = regions_file(
        &cert.dir,
        &[
            Region::new("open", "127.0.0.1")
                .set("udp_port", open.udp.port())
                .set("tcp_port", open.addr_of("tcp").port())
                .alice(),
            Region::new("limited", "127.0.0.1")
                .set("udp_port", limited.udp.port())
                .alice(),
        ],
    );
    let regions = regions.to_str().expect("path");
    let (ok, out) = probe(&[
        "measure",
        "--regions",
        regions,
        "--samples",
        "2",
        "--bandwidth",
        "6M",
        "--bandwidth-secs",
        "3",
        "--json",
    ]);
    assert!(ok, "{out}");
    let report = json(&out);
    for p in ["turn-udp", "turn-tcp"] {
        let b = &path(&report, "open", p)["bandwidth"];
        assert_eq!(b["meets"], true, "{p}: {b}");
        assert_eq!(b["required_mbps"], 6.0, "{b}");
        assert!(
            b["sustained_mbps"].as_f64().is_some_and(|m| m >= 5.7),
            "{p}: {b}"
        );
        assert!(b["rtt_ms"].as_f64().is_some(), "{b}");
        assert_eq!(b["video"], "1080p", "{b}");
        assert!(b["relay_limit_mbps"].is_null(), "no limit told: {b}");
    }
    let b = &path(&report, "limited", "turn-udp")["bandwidth"];
    assert_eq!(b["meets"], false, "{b}");
    // In BANDWIDTH's unit of 128 bytes a second, as coturn sends it too.
    assert!(
        b["relay_limit_mbps"]
            .as_f64()
            .is_some_and(|l| (l - 2.0).abs() < 0.01),
        "the relay told its limit: {b}"
    );
    assert_eq!(b["limited_by_relay"], true, "{b}");
    // The rate kept up is the quota's, at most: the bucket's first second only adds a burst.
    let sustained = b["sustained_mbps"].as_f64().expect("sustained");
    assert!(sustained > 1.6 && sustained <= 2.3, "{b}");
    assert!(
        b["received_mbps"].as_f64().is_some_and(|m| m > sustained),
        "{b}"
    );
    // Paths without a relay in between are not bandwidth-tested.
    assert!(path(&report, "open", "stun-udp")["bandwidth"].is_null());
    // What people read: the kept-up rate, and the relay's quota as the limit.
    let (_, table) = measure_text(
        Path::new(regions),
        &["--bandwidth", "6M", "--bandwidth-secs", "2"],
    );
    let line = table
        .lines()
        .find(|l| l.starts_with("bandwidth: limited turn-udp"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        line.contains("of 6.00 Mbit/s kept up through the relay")
            && line.contains("DOES NOT meet the requirement")
            && line.contains("limited by the relay's bandwidth quota of 2.00 Mbit/s"),
        "{line}"
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
    let regions = regions_file(
        &dir.dir,
        &[Region::new("office-eu", "127.0.0.1")
            .set("udp_port", r.udp.port())
            .set("tcp_port", closed_tcp)
            .alice()],
    );
    let html = dir.dir.join("report.html");
    let (ok, out) = measure_text(
        &regions,
        &[
            "--bandwidth",
            "1M",
            "--bandwidth-secs",
            "1",
            "--report",
            html.to_str().expect("path"),
        ],
    );
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
        &format!(
            "Nothing listens at 127.0.0.1 port {closed_tcp}, or a firewall rejects connections to it"
        ),
        "the host is up: it answered on UDP",
        "REFUSED: nothing listens there, or a firewall rejects",
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
    in_netns(
        "probe-behind-proxy.sh",
        &[
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
            .is_some_and(|d| d
                .contains("tried: timeout: datagrams from here to the relayed address 10.99.0.1:")),
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
    // The relay answered over TCP: UDP is blocked on the way, not the relay down.
    assert!(
        !report.contains("Check first that the relay"),
        "a relay that answers is not suspected:\n{report}"
    );
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

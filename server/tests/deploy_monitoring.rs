//! The monitoring files in deploy/: alert rules checked and unit-tested with promtool, a real
//! Prometheus scraping a running relay and probe and firing an alert when the relay stops,
//! and the Grafana dashboard type-checked against @grafana/schema with every metric it
//! queries present in a live scrape.

mod common;

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, http_get, probe_binary, run_tool, Child2, Relay, TestCert};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

#[test]
fn alert_rules_check_and_pass_their_unit_tests() {
    let dir = format!("{ROOT}/deploy/prometheus");
    let out = run_tool(
        "promtool",
        &["check", "rules", &format!("{dir}/turnpike-alerts.yml")],
        60,
    );
    assert!(
        out.contains("SUCCESS: 6 rules found"),
        "{out} (.ci/run installs prometheus)"
    );
    let out = Command::new("promtool")
        .args(["test", "rules", "turnpike-alerts.test.yml"])
        .current_dir(&dir)
        .output()
        .expect("promtool");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("SUCCESS"), "{text}");
}

/// Starts a probe exporter watching `relay` every second (and its TLS listener, where the
/// certificate is given); returns it and its address.
fn probe_watching(
    relay: &Relay,
    dir: &std::path::Path,
    tls: Option<&TestCert>,
) -> (Child2, String) {
    let regions = dir.join("regions.toml");
    let mut region = format!(
        "[[region]]\nname = \"eu\"\nhost = \"127.0.0.1\"\nudp_port = {}\nusername = \"alice\"\npassword = \"wonderland\"\n",
        relay.udp.port()
    );
    if let Some(cert) = tls {
        region += &format!(
            "tls_port = {}\ntls_name = \"turn.test\"\nca_file = \"{}\"\n",
            relay.addr_of("tls").port(),
            cert.cert.display()
        );
    }
    std::fs::write(&regions, region).expect("regions");
    let listen = format!("127.0.0.1:{}", free_port());
    let child = Child2(
        Command::new(probe_binary())
            .args([
                "watch",
                "--regions",
                regions.to_str().expect("p"),
                "--listen",
                &listen,
                "--every",
                "1",
                "--samples",
                "2",
                "--timeout-ms",
                "300",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("turnpike-probe"),
    );
    (child, listen)
}

fn wait_until(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn prometheus_scrapes_relay_and_probe_and_alerts_when_the_relay_stops() {
    let dir = TestCert::new("prometheus", &["unused"]);
    let relay = Relay::start(&["--allow-peer", "127.0.0.0/8", "--user", "alice:wonderland"]);
    let (_probe, probe_addr) = probe_watching(&relay, &dir.dir, None);
    // The shipped rules, with their `for:` durations shortened so the test need not wait minutes.
    let rules = std::fs::read_to_string(format!("{ROOT}/deploy/prometheus/turnpike-alerts.yml"))
        .expect("rules");
    let rules: String = rules
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("for:") {
                "        for: 1s".to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.dir.join("alerts.yml"), rules).expect("rules");
    std::fs::write(
        dir.dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [alerts.yml]\nscrape_configs:\n  - job_name: turnpike\n    static_configs: [{{targets: ['{}']}}]\n  - job_name: turnpike-probe\n    static_configs: [{{targets: ['{probe_addr}']}}]\n",
            relay.metrics
        ),
    )
    .expect("config");
    let web = format!("127.0.0.1:{}", free_port());
    let _prometheus = Child2(
        Command::new("prometheus")
            .args([
                &format!("--config.file={}", dir.dir.join("prometheus.yml").display()),
                &format!("--storage.tsdb.path={}", dir.dir.join("data").display()),
                &format!("--web.listen-address={web}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (.ci/run installs it)"),
    );
    let web_addr: std::net::SocketAddr = web.parse().expect("addr");
    let query = |q: &str| {
        let path = format!(
            "/api/v1/query?query={}",
            q.replace(' ', "%20")
                .replace('"', "%22")
                .replace('{', "%7B")
                .replace('}', "%7D")
                .replace('=', "%3D")
        );
        std::net::TcpStream::connect(web_addr)
            .ok()
            .map(|_| http_get(web_addr, &path).1)
            .unwrap_or_default()
    };
    wait_until("the relay scraped", 60, || {
        query("up{job=\"turnpike\"} == 1").contains("\"value\"")
    });
    wait_until("the probe's relayed path up", 60, || {
        query("turnpike_probe_up{path=\"turn-udp\"} == 1").contains("\"value\"")
    });
    assert!(query("turnpike_build_info").contains("\"version\":\"0.1.0\""));
    drop(relay);
    let alerts = || {
        std::net::TcpStream::connect(web_addr)
            .ok()
            .map(|_| http_get(web_addr, "/api/v1/alerts").1)
            .unwrap_or_default()
    };
    wait_until("TurnpikeRelayDown firing", 60, || {
        let a = alerts();
        a.contains("\"alertname\":\"TurnpikeRelayDown\"") && a.contains("\"state\":\"firing\"")
    });
    wait_until("TurnpikeRegionUnreachable firing", 60, || {
        alerts().contains("\"alertname\":\"TurnpikeRegionUnreachable\"")
    });
}

#[test]
fn grafana_dashboard_type_checks_and_queries_existing_metrics() {
    let grafana = format!("{ROOT}/tests/grafana");
    assert!(
        std::path::Path::new(&format!("{grafana}/node_modules/typescript")).exists(),
        "run `npm ci` in tests/grafana (.ci/run does)"
    );
    let json =
        std::fs::read_to_string(format!("{ROOT}/deploy/grafana/turnpike.json")).expect("dashboard");
    let check = format!("{grafana}/check-{}.ts", std::process::id());
    std::fs::write(&check, format!("import type {{ Dashboard }} from '@grafana/schema';\nexport const dashboard = ({json}) satisfies Dashboard;\n")).expect("write");
    let out = Command::new(format!("{grafana}/node_modules/.bin/tsc"))
        .args([
            "--noEmit",
            "--strict",
            "--moduleResolution",
            "node",
            "--module",
            "esnext",
            "--target",
            "es2020",
            &check,
        ])
        .output()
        .expect("tsc");
    let _ = std::fs::remove_file(&check);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Every metric the dashboard queries exists in what the relay and the probe expose.
    let dashboard: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    let mut wanted = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("turnpike_") {
                    wanted.insert(word.to_owned());
                }
            }
        }
    }
    let dir = TestCert::new("grafana", &["turn.test"]);
    let relay = Relay::start(&[
        "--allow-peer",
        "127.0.0.0/8",
        "--user",
        "alice:wonderland",
        "--echo-udp",
        "127.0.0.1:0",
        "--listen",
        "tls://127.0.0.1:0",
        "--cert",
        dir.cert.to_str().expect("p"),
        "--key",
        dir.key.to_str().expect("p"),
    ]);
    // Make the echo counters appear.
    let echo = relay.addr_of("echo-udp");
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    s.send_to(b"hello", echo).expect("send");
    let mut b = [0u8; 16];
    let _ = s.recv_from(&mut b);
    let (_probe, probe_addr) = probe_watching(&relay, &dir.dir, Some(&dir));
    let probe_addr: std::net::SocketAddr = probe_addr.parse().expect("addr");
    let mut exposed = String::new();
    wait_until("a probe round", 30, || {
        exposed = std::net::TcpStream::connect(probe_addr)
            .ok()
            .map(|_| http_get(probe_addr, "/metrics").1)
            .unwrap_or_default();
        exposed.contains("turnpike_probe_rounds_total 1")
            || exposed.contains("turnpike_probe_rounds_total 2")
    });
    exposed += &http_get(relay.metrics, "/metrics").1;
    let names: BTreeSet<&str> = exposed
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let missing: Vec<_> = wanted
        .iter()
        .filter(|w| !names.contains(w.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics nothing exposes: {missing:?}"
    );
    assert!(wanted.len() >= 15, "{wanted:?}");
}

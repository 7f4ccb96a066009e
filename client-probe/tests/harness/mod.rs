//! What the probe's end-to-end tests share: the probe run as a user runs it, its JSON read
//! back, regions files, relays, and real proxies (tinyproxy, mitmproxy) on loopback.

#![allow(dead_code)]

#[path = "../../../server/tests/common/mod.rs"]
pub mod common;

use std::fmt::Display;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub use common::{free_port, Child2, Relay, TestCert};

/// `turnpike-probe ARGS` (no proxy from the environment): success, and stdout then stderr.
pub fn probe(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_turnpike-probe"))
        .args(args)
        .env_remove("HTTPS_PROXY")
        .output()
        .expect("run turnpike-probe");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// The JSON document in the probe's output.
pub fn json(text: &str) -> serde_json::Value {
    let line = text
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON:\n{text}"));
    serde_json::from_str(line).expect("JSON")
}

/// One path's result in a report.
pub fn path<'a>(report: &'a serde_json::Value, region: &str, path: &str) -> &'a serde_json::Value {
    report["results"]
        .as_array()
        .expect("results")
        .iter()
        .find(|r| r["region"] == region && r["path"] == path)
        .unwrap_or_else(|| panic!("no {region}/{path} in {report}"))
}

/// A path's error text (the path must have failed).
pub fn error(report: &serde_json::Value, region: &str, p: &str) -> String {
    let r = path(report, region, p);
    assert_eq!(r["reachable"], false, "{r}");
    r["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error for {region} {p}: {r}"))
        .to_owned()
}

/// The firewall row of `region` whose protocol is `protocol` (`UDP`, `TCP`, `TCP/TLS`,
/// `HTTP CONNECT`) and whose purpose starts with `purpose`.
pub fn row<'a>(
    report: &'a serde_json::Value,
    region: &str,
    protocol: &str,
    purpose: &str,
) -> &'a serde_json::Value {
    report["firewall"]
        .as_array()
        .expect("firewall rows (--firewall)")
        .iter()
        .find(|r| {
            r["region"] == region
                && r["protocol"] == protocol
                && r["purpose"]
                    .as_str()
                    .is_some_and(|p| p.starts_with(purpose))
        })
        .unwrap_or_else(|| panic!("no {protocol} {purpose:?} row of {region}: {report}"))
}

/// The relay ports' row of `region`.
pub fn relayed_row<'a>(report: &'a serde_json::Value, region: &str) -> &'a serde_json::Value {
    row(report, region, "UDP", "relayed media")
}

/// A verdict and its detail, as the firewall table prints them.
pub fn said(row: &serde_json::Value) -> (String, String) {
    (
        row["verdict"].as_str().expect("verdict").to_owned(),
        row["detail"].as_str().unwrap_or_default().to_owned(),
    )
}

/// One `[[region]]` of a regions file.
#[derive(Clone)]
pub struct Region(String);

impl Region {
    pub fn new(name: &str, host: &str) -> Region {
        Region(format!(
            "[[region]]\nname = \"{name}\"\nhost = \"{host}\"\n"
        ))
    }

    /// A number, as `udp_port = 3478`.
    pub fn set(mut self, key: &str, value: impl Display) -> Region {
        self.0 += &format!("{key} = {value}\n");
        self
    }

    /// A string, as `tls_name = "turn.test"`.
    pub fn text(mut self, key: &str, value: impl Display) -> Region {
        self.0 += &format!("{key} = \"{value}\"\n");
        self
    }

    /// TLS on `port`, checked against `name` and, when given, the CA file `ca`.
    pub fn tls(self, port: u16, name: &str, ca: Option<&Path>) -> Region {
        let r = self.set("tls_port", port).text("tls_name", name);
        match ca {
            Some(ca) => r.text("ca_file", ca.display()),
            None => r,
        }
    }

    /// The relays' static user of these tests.
    pub fn alice(self) -> Region {
        self.text("username", "alice")
            .text("password", "wonderland")
    }
}

/// Writes `regions` to `dir/regions.toml`.
pub fn regions_file(dir: &Path, regions: &[Region]) -> PathBuf {
    let file = dir.join("regions.toml");
    let text: Vec<&str> = regions.iter().map(|r| r.0.as_str()).collect();
    std::fs::write(&file, text.join("\n")).expect("regions.toml");
    file
}

/// `measure --json --firewall` over `regions`, two samples a path, 500 ms each unless `extra`
/// says otherwise, plus `extra`: success, the report, and all the probe printed.
pub fn measure(regions: &Path, extra: &[&str]) -> (bool, serde_json::Value, String) {
    let mut args = vec!["--json", "--firewall"];
    args.extend_from_slice(extra);
    let (ok, out) = measure_text(regions, &args);
    (ok, json(&out), out)
}

/// `measure` over `regions` as people run it (no `--json`), two samples a path, 500 ms each,
/// plus `extra`: success, and all the probe printed.
pub fn measure_text(regions: &Path, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["measure", "--regions", regions.to_str().expect("path")];
    // The defaults, unless `extra` says otherwise.
    for (flag, value) in [("--samples", "2"), ("--timeout-ms", "500")] {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    probe(&args)
}

/// A relay on loopback on exactly `listen` (`udp://127.0.0.1:0`...), serving `cert`'s
/// certificate on its TLS listeners, loopback peers allowed, alice its user, plus `extra`.
pub fn relay_on(listen: &[&str], cert: Option<&TestCert>, extra: &[&str]) -> Relay {
    let mut args = Vec::new();
    for l in listen {
        args.extend(["--listen", l]);
    }
    if let Some(c) = cert {
        args.extend([
            "--cert",
            c.cert.to_str().expect("path"),
            "--key",
            c.key.to_str().expect("path"),
        ]);
    }
    args.extend([
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
    args.extend_from_slice(extra);
    Relay::spawn(&args)
}

/// A relay on loopback with a TCP listener beside its UDP one, loopback peers allowed, and
/// alice.
pub fn relay(extra: &[&str]) -> Relay {
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

/// The same with a TLS listener serving `cert` and `key` (PEM files).
pub fn tls_relay(cert: &Path, key: &Path, extra: &[&str]) -> Relay {
    let mut args = vec![
        "--listen",
        "tls://127.0.0.1:0",
        "--cert",
        cert.to_str().expect("path"),
        "--key",
        key.to_str().expect("path"),
    ];
    args.extend_from_slice(extra);
    relay(&args)
}

/// Waits (bounded) until something accepts TCP connections on 127.0.0.1:`port`.
pub fn wait_listening(port: u16, secs: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A real HTTP CONNECT proxy (tinyproxy) on loopback that lets CONNECT through to
/// `connect_ports` only; its port.
pub fn tinyproxy(dir: &Path, connect_ports: &[u16]) -> (Child2, u16) {
    let port = free_port();
    let conf = dir.join(format!("tinyproxy-{port}.conf"));
    let allowed: String = connect_ports
        .iter()
        .map(|p| format!("ConnectPort {p}\n"))
        .collect();
    std::fs::write(
        &conf,
        format!("Port {port}\nListen 127.0.0.1\nAllow 127.0.0.1\n{allowed}MaxClients 10\n"),
    )
    .expect("conf");
    let child = Child2(
        Command::new("tinyproxy")
            .args(["-d", "-c", conf.to_str().expect("path")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tinyproxy (.ci/run installs it)"),
    );
    wait_listening(port, 10, "tinyproxy");
    (child, port)
}

/// A real proxy that inspects TLS (mitmproxy, re-signing with its own CA, which it writes to
/// `dir/mitmproxy`); its port and its CA certificate.
pub fn mitmproxy(dir: &Path) -> (Child2, u16, PathBuf) {
    let port = free_port();
    let confdir = dir.join("mitmproxy");
    let child = Child2(
        Command::new("mitmdump")
            .args(["--listen-host", "127.0.0.1", "-p", &port.to_string()])
            .args(["--set", &format!("confdir={}", confdir.display())])
            // It reaches the relay's self-signed certificate itself.
            .args(["--ssl-insecure", "-q"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mitmdump (.ci/run installs mitmproxy)"),
    );
    wait_listening(port, 60, "mitmdump");
    (child, port, confdir.join("mitmproxy-ca-cert.pem"))
}

/// Runs tests/netns/`script` in a network namespace of its own with `args`; its output.
pub fn in_netns(script: &str, args: &[&str], secs: u64) -> String {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let script = format!("{root}/tests/netns/{script}");
    let mut all = vec!["--net", "--fork", script.as_str()];
    all.extend_from_slice(args);
    common::run_tool("unshare", &all, secs)
}

/// The count of packets the probe says it wrote to its capture.
pub fn packets_written(output: &str) -> usize {
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
pub fn tshark(file: &Path, args: &[&str]) -> String {
    let o = Command::new("tshark")
        .arg("-r")
        .arg(file)
        .args(args)
        .output()
        .expect("tshark (.ci/run installs it)");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

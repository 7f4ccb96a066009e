//! Fleet test helpers: relays reading a store, the admin CLI, ephemeral credentials, session
//! records, and a PostgreSQL server of the test's own.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{run_tool, RawClient, Relay};
use turnpike_proto::auth::{ephemeral_password, ephemeral_username};
use turnpike_proto::stun::{attr, Message};

pub const KEY: &str = "test-admin-key-0123456789";

pub fn key_hash() -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(KEY.as_bytes());
    format!(
        "sha256:{}",
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

pub fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("turnpike-fleet-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    d
}

/// A relay on loopback reading `store`, with the admin key, loopback peers allowed.
pub fn relay(dir: &std::path::Path, name: &str, store: &str, extra: &str, flags: &[&str]) -> Relay {
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(
        &file,
        format!(
            "[auth]\nsecrets = [\"the-top-level-secret-0123456789\"]\n[peer]\nallow = [\"127.0.0.0/8\"]\n\
             [store]\nurl = {store:?}\nrelay_name = {name:?}\nstate_dir = {:?}\n[[admin.keys]]\nname = \"ops\"\nhash = {:?}\n{extra}",
            dir.join(format!("{name}-state")),
            key_hash()
        ),
    )
    .expect("config");
    let mut args = vec![
        "--listen",
        "udp://127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--relay-ip",
        "127.0.0.1",
        "--threads",
        "2",
        "--config",
        file.to_str().expect("path"),
    ];
    args.extend_from_slice(if flags.is_empty() {
        &["--drain-grace", "5"]
    } else {
        flags
    });
    Relay::spawn(&args)
}

/// `turnpike admin ARGS` against `relay`'s metrics listener: (success, output).
pub fn admin(relay: &Relay, args: &[&str]) -> (bool, String) {
    let out = Command::new(super::relay_binary())
        .arg("admin")
        .args(["--url", &format!("http://{}", relay.metrics), "--key", KEY])
        .args(args)
        .output()
        .expect("turnpike admin");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Ephemeral credentials of `user` minted with `secret`, valid for an hour.
pub fn credentials(secret: &str, user: &str) -> (String, String) {
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 3600;
    let username = ephemeral_username(expiry, Some(user));
    let password = ephemeral_password(secret, &username);
    (username, password)
}

/// Allocates until the relay accepts the credentials (or `secs` pass); the client, and how
/// long it took.
pub fn allocate_when_accepted(
    server: SocketAddr,
    secret: &str,
    user: &str,
    secs: u64,
) -> (RawClient, Duration) {
    let start = Instant::now();
    let (u, p) = credentials(secret, user);
    loop {
        let mut c = RawClient::new(server, &u, &p);
        let r = c.allocate();
        if r.code().is_none() {
            return (c, start.elapsed());
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "the relay at {server} still refuses {user}: {:?}",
            r.code()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The session records (JSON lines) in a relay's output.
pub fn sessions(relay: &Relay) -> Vec<serde_json::Value> {
    relay
        .log_text()
        .lines()
        .filter(|l| l.starts_with("{\"record\":\"session\""))
        .map(|l| serde_json::from_str(l).expect("record"))
        .collect()
}

pub fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A PostgreSQL server of the test's own, on a Unix socket in a private directory, run
/// with `pg_ctl` as the `postgres` user (PostgreSQL refuses to run as root).
pub struct Postgres {
    dir: std::path::PathBuf,
}

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

impl Postgres {
    pub fn start(dir: &std::path::Path) -> Postgres {
        std::fs::create_dir_all(dir.join("pgsock")).expect("sock dir");
        run_tool(
            "chown",
            &["-R", "postgres", dir.to_str().expect("path")],
            10,
        );
        let pg = Postgres {
            dir: dir.to_owned(),
        };
        let out = pg.as_postgres(
            "initdb",
            &[
                "-D",
                &pg.data(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.run();
        pg
    }

    pub fn data(&self) -> String {
        self.dir.join("pgdata").display().to_string()
    }

    pub fn as_postgres(&self, tool: &str, args: &[&str]) -> std::process::Output {
        Command::new("runuser")
            .args(["-u", "postgres", "--", &format!("{PG_BIN}/{tool}")])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("PostgreSQL (.ci/run installs postgresql)")
    }

    /// A server that also listens on 127.0.0.1:`port` with TLS (the certificate and key
    /// of `cert`), besides its Unix socket.
    pub fn start_tls(dir: &std::path::Path, cert: &super::TestCert, port: u16) -> Postgres {
        std::fs::create_dir_all(dir).expect("dir");
        std::fs::copy(&cert.cert, dir.join("server.crt")).expect("cert");
        std::fs::copy(&cert.key, dir.join("server.key")).expect("key");
        run_tool(
            "chmod",
            &["600", &dir.join("server.key").display().to_string()],
            10,
        );
        let tls = format!(
            "-c listen_addresses=127.0.0.1 -c ssl=on -c ssl_cert_file={} -c ssl_key_file={} -c port={port}",
            dir.join("server.crt").display(),
            dir.join("server.key").display()
        );
        std::fs::write(dir.join("extra-options"), tls).expect("options");
        Postgres::start(dir)
    }

    /// The port it listens on (5432 on its socket, or the TLS test's TCP port).
    fn port(&self) -> String {
        std::fs::read_to_string(self.dir.join("extra-options"))
            .ok()
            .and_then(|o| o.split("port=").nth(1).map(|p| p.trim().to_owned()))
            .unwrap_or_else(|| "5432".into())
    }

    /// Starts the server and waits (`-w`) until it accepts connections.
    pub fn run(&self) {
        let extra = std::fs::read_to_string(self.dir.join("extra-options")).unwrap_or_default();
        let opts = format!(
            "-k {} -c fsync=off -c listen_addresses= -p 5432 {extra}",
            self.dir.join("pgsock").display()
        );
        let log = self.dir.join("pg.log").display().to_string();
        let out = self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-o",
                &opts,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Runs `sql` with psql on the test's server; its output (an error fails the test).
    pub fn sql(&self, sql: &str) -> String {
        let sock = self.dir.join("pgsock").display().to_string();
        let out = self.as_postgres(
            "psql",
            &[
                "-h",
                &sock,
                "-p",
                &self.port(),
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-tAc",
                sql,
            ],
        );
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    pub fn url(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.dir.join("pgsock").display(),
            self.port()
        )
    }

    pub fn stop(&self) {
        let _ = self.as_postgres(
            "pg_ctl",
            &["-D", &self.data(), "-m", "fast", "-w", "-t", "60", "stop"],
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The first Allocate's 300 Try Alternate, with the sibling's address.
pub fn alternate_of(r: &super::Response) -> Option<SocketAddr> {
    let m: Message<'_> = r.msg();
    let v = m.get(attr::ALTERNATE_SERVER)?;
    // MAPPED-ADDRESS format: 0, family, port, address.
    let port = u16::from_be_bytes([v[2], v[3]]);
    (v[1] == 1).then(|| SocketAddr::from(([v[4], v[5], v[6], v[7]], port)))
}

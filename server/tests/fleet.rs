//! Fleet operations end to end: tenants in a real store (SQLite files, and a PostgreSQL server
//! the test starts on a private socket directory), changed through `turnpike admin`, honoured
//! by running relays; revocation ending live allocations on every relay; the relays going on
//! when the database stops; session records whose byte counts match what the client sent;
//! and a draining or full relay sending a real client (coturn's `turnutils_uclient`, which
//! follows ALTERNATE-SERVER) to its sibling with 300 Try Alternate.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};

use std::time::{Duration, Instant};

use common::{run_tool, RawClient, Relay};
use turnpike_proto::auth::{ephemeral_password, ephemeral_username};
use turnpike_proto::stun::{attr, method, Message};

const KEY: &str = "test-admin-key-0123456789";

fn key_hash() -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(KEY.as_bytes());
    format!(
        "sha256:{}",
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("turnpike-fleet-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    d
}

/// A relay on loopback reading `store`, with the admin key, loopback peers allowed.
fn relay(dir: &std::path::Path, name: &str, store: &str, extra: &str, flags: &[&str]) -> Relay {
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(
        &file,
        format!(
            "[auth]\nsecrets = [\"the-top-level-secret-0123456789\"]\n[peer]\nallow = [\"127.0.0.0/8\"]\n\
             [store]\nurl = {store:?}\nrelay_name = {name:?}\n[[admin.keys]]\nname = \"ops\"\nhash = {:?}\n{extra}",
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
fn admin(relay: &Relay, args: &[&str]) -> (bool, String) {
    let out = Command::new(common::relay_binary())
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
fn credentials(secret: &str, user: &str) -> (String, String) {
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
fn allocate_when_accepted(
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
fn sessions(relay: &Relay) -> Vec<serde_json::Value> {
    relay
        .log_text()
        .lines()
        .filter(|l| l.starts_with("{\"record\":\"session\""))
        .map(|l| serde_json::from_str(l).expect("record"))
        .collect()
}

fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A tenant made through `turnpike admin` on a relay with a SQLite store authenticates; its
/// allocation's record counts the bytes sent; usage adds up; a revoked user's allocation
/// ends; the admin API refuses a wrong key, a clash, and lists and ends allocations.
#[test]
fn sqlite_store_tenants_from_the_admin_cli_work_and_sessions_are_recorded() {
    let dir = temp_dir("sqlite");
    let db = dir.join("state/store.db");
    let r = relay(&dir, "solo", &format!("sqlite:{}", db.display()), "", &[]);
    r.wait_for_log("tenant store");
    assert!(db.exists(), "the store file is created on first start");

    let (ok, out) = admin(
        &r,
        &[
            "add-tenant",
            "acme",
            "--realm",
            "acme.test",
            "--secret",
            "acme-secret-0123456789abcdef",
        ],
    );
    assert!(ok, "{out}");
    let (c, _) = allocate_when_accepted(r.udp, "acme-secret-0123456789abcdef", "u1", 10);
    // The store change was heard at once (a reload after the first load), not at the 30 s
    // safety poll.
    assert!(
        r.log_text().matches("trigger=\"store changed\"").count() >= 2,
        "{}",
        r.log_text()
    );

    // Secrets never come back; a wrong key and a clashing tenant are refused.
    let (ok, out) = admin(&r, &["tenants"]);
    assert!(
        ok && out.contains("\"acme\"") && !out.contains("acme-secret"),
        "{out}"
    );
    let bad = Command::new(common::relay_binary())
        .args([
            "admin",
            "--url",
            &format!("http://{}", r.metrics),
            "--key",
            "wrong",
            "tenants",
        ])
        .output()
        .expect("admin");
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("401"));
    let (ok, out) = admin(
        &r,
        &[
            "add-tenant",
            "other",
            "--realm",
            "acme.test",
            "--secret",
            "another-secret-0123456789",
        ],
    );
    assert!(!ok && out.contains("realm is another tenant"), "{out}");

    // Relay 3 x 100 bytes to a peer, then release: the record says so.
    let peer = UdpSocket::bind("127.0.0.1:0").expect("peer");
    let mut c = c;
    assert_eq!(
        c.request(method::CHANNEL_BIND, |b| {
            b.u32(attr::CHANNEL_NUMBER, 0x4000 << 16)
                .xor_address(attr::XOR_PEER_ADDRESS, peer.local_addr().expect("addr"));
        })
        .code(),
        None
    );
    peer.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut buf = [0u8; 256];
    for _ in 0..3 {
        let mut frame = vec![0x40, 0x00, 0x00, 100];
        frame.extend_from_slice(&[7u8; 100]);
        c.sock.send_to(&frame, r.udp).expect("send");
        assert_eq!(peer.recv_from(&mut buf).expect("relayed").0, 100);
    }
    let (ok, out) = admin(&r, &["allocations", "--tenant", "acme"]);
    assert!(
        ok && out.contains("\"bytes_up\": 300") && out.contains("\"transport\": \"udp\""),
        "{out}"
    );
    assert_eq!(
        c.request(method::REFRESH, |b| {
            b.u32(attr::LIFETIME, 0);
        })
        .code(),
        None
    );
    r.wait_for_log("{\"record\":\"session\"");
    let rec = &sessions(&r)[0];
    assert_eq!(
        (
            rec["tenant"].as_str(),
            rec["user_id"].as_str(),
            rec["transport"].as_str()
        ),
        (Some("acme"), Some("u1"), Some("udp"))
    );
    assert_eq!(
        (rec["bytes_up"].as_u64(), rec["packets_up"].as_u64()),
        (Some(300), Some(3)),
        "{rec}"
    );
    assert_eq!(
        (rec["peers"].as_u64(), rec["reason"].as_str()),
        (Some(1), Some("released")),
        "{rec}"
    );
    assert!(
        !rec.to_string().contains("127.0.0.1"),
        "no peer or client address: {rec}"
    );
    wait_until(10, "usage written", || {
        let (_, out) = admin(&r, &["usage", "--tenant", "acme"]);
        out.contains("\"bytes_up\": 300")
    });

    // Revoking a user ends their live allocation; an operator can end one by id.
    let (_c2, _) = allocate_when_accepted(r.udp, "acme-secret-0123456789abcdef", "mallory", 10);
    let (ok, out) = admin(&r, &["revoke", "acme", "mallory"]);
    assert!(ok, "{out}");
    wait_until(10, "revoked allocation ended", || {
        sessions(&r)
            .iter()
            .any(|s| s["user_id"] == "mallory" && s["reason"] == "revoked")
    });
    let (_c3, _) = allocate_when_accepted(r.udp, "acme-secret-0123456789abcdef", "u3", 10);
    let (_, out) = admin(&r, &["allocations", "--user", "u3"]);
    let list: serde_json::Value = serde_json::from_str(&out).expect("json");
    let id = list["allocations"][0]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let (ok, out) = admin(&r, &["end", &id]);
    assert!(ok, "{out}");
    wait_until(10, "ended allocation", || {
        sessions(&r)
            .iter()
            .any(|s| s["user_id"] == "u3" && s["reason"] == "ended")
    });
    let _ = std::fs::remove_dir_all(&dir);
}

/// A PostgreSQL server of the test's own, on a Unix socket in a private directory, run
/// with `pg_ctl` as the `postgres` user (PostgreSQL refuses to run as root).
struct Postgres {
    dir: std::path::PathBuf,
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

impl Postgres {
    fn start(dir: &std::path::Path) -> Postgres {
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

    fn data(&self) -> String {
        self.dir.join("pgdata").display().to_string()
    }

    fn as_postgres(&self, tool: &str, args: &[&str]) -> std::process::Output {
        Command::new("runuser")
            .args(["-u", "postgres", "--", &format!("{PG_BIN}/{tool}")])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("PostgreSQL (.ci/run installs postgresql)")
    }

    /// Starts the server and waits (`-w`) until it accepts connections.
    fn run(&self) {
        let opts = format!(
            "-k {} -c listen_addresses= -c fsync=off -p 5432",
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

    fn url(&self) -> String {
        format!(
            "host={} port=5432 user=postgres dbname=postgres",
            self.dir.join("pgsock").display()
        )
    }

    fn stop(&self) {
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

/// Two relays on one PostgreSQL database: a tenant created through one relay's admin API
/// works on both (within the time of a NOTIFY, not the 30 s poll); a revoked user's live
/// allocations end on both; with the database stopped both go on relaying, serving their
/// last copy and saying so in `/readyz` and `turnpike_store_up`.
#[test]
fn postgresql_fleet_shares_tenants_and_revocations_and_survives_the_database_going_away() {
    let dir = temp_dir("pg");
    let pg = Postgres::start(&dir.join("db"));
    let url = pg.url();
    let a = relay(&dir, "relay-a", &url, "", &[]);
    let b = relay(&dir, "relay-b", &url, "", &[]);
    for r in [&a, &b] {
        wait_until(20, "store up", || r.metric("turnpike_store_up") == 1.0);
    }
    let (ok, out) = admin(
        &a,
        &[
            "add-tenant",
            "globex",
            "--realm",
            "globex.test",
            "--secret",
            "globex-secret-0123456789abc",
        ],
    );
    assert!(ok, "{out}");
    let (ca, ta) = allocate_when_accepted(a.udp, "globex-secret-0123456789abc", "eve", 10);
    let (cb, tb) = allocate_when_accepted(b.udp, "globex-secret-0123456789abc", "eve", 10);
    println!("tenant honoured after {ta:?} (relay a), {tb:?} (relay b)");
    assert!(
        b.log_text().contains("trigger=\"store changed\""),
        "{}",
        b.log_text()
    );

    let (ok, out) = admin(&b, &["revoke", "globex", "eve"]);
    assert!(ok, "{out}");
    for r in [&a, &b] {
        wait_until(10, "revoked allocation ended on every relay", || {
            sessions(r)
                .iter()
                .any(|s| s["user_id"] == "eve" && s["reason"] == "revoked")
        });
    }
    drop((ca, cb));

    // The database goes away: both relays keep the tenant and relay.
    let (_keep, _) = allocate_when_accepted(a.udp, "globex-secret-0123456789abc", "frank", 10);
    pg.stop();
    for r in [&a, &b] {
        wait_until(20, "store reported down", || {
            r.metric("turnpike_store_up") == 0.0
        });
        let (status, body) = r.http_get("/readyz");
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains("store: unreachable") && body.contains("serving the copy loaded at"),
            "{body}"
        );
        let (mut c, _) = allocate_when_accepted(r.udp, "globex-secret-0123456789abc", "grace", 5);
        let peer = UdpSocket::bind("127.0.0.1:0").expect("peer");
        let to = peer.local_addr().expect("addr");
        assert_eq!(
            c.request(method::CHANNEL_BIND, |bld| {
                bld.u32(attr::CHANNEL_NUMBER, 0x4001 << 16)
                    .xor_address(attr::XOR_PEER_ADDRESS, to);
            })
            .code(),
            None
        );
        c.sock
            .send_to(&[0x40, 0x01, 0x00, 0x04, 1, 2, 3, 4], r.udp)
            .expect("send");
        peer.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 16];
        assert_eq!(
            peer.recv_from(&mut buf)
                .expect("relayed with the database down")
                .0,
            4
        );
    }
    // And it comes back: both relays reconnect.
    pg.run();
    for r in [&a, &b] {
        wait_until(30, "store up again", || {
            r.metric("turnpike_store_up") == 1.0
        });
    }
}

/// The first Allocate's 300 Try Alternate, with the sibling's address.
fn alternate_of(r: &common::Response) -> Option<SocketAddr> {
    let m: Message<'_> = r.msg();
    let v = m.get(attr::ALTERNATE_SERVER)?;
    // MAPPED-ADDRESS format: 0, family, port, address.
    let port = u16::from_be_bytes([v[2], v[3]]);
    (v[1] == 1).then(|| SocketAddr::from(([v[4], v[5], v[6], v[7]], port)))
}

/// A relay at its allocation limit, then draining, answers Allocate with 300 and the
/// sibling's address; coturn's uclient follows it and relays through the sibling.
#[test]
fn a_full_or_draining_relay_sends_clients_to_its_sibling() {
    let dir = temp_dir("redirect");
    let sibling = relay(
        &dir,
        "sibling",
        &format!("sqlite:{}", dir.join("s.db").display()),
        "",
        &[],
    );
    let extra = format!(
        "[redirect]\nmax_allocations = 1\nsiblings = [{{ udp = [\"{}\"] }}]\n",
        sibling.udp
    );
    let a = relay(
        &dir,
        "a",
        &format!("sqlite:{}", dir.join("a.db").display()),
        &extra,
        &["--drain-grace", "60"],
    );
    let secret = "the-top-level-secret-0123456789";
    let (_held, _) = allocate_when_accepted(a.udp, secret, "first", 10);
    wait_until(10, "redirecting", || {
        a.metric("turnpike_redirecting") == 1.0
    });
    let (u, p) = credentials(secret, "second");
    let mut c = RawClient::new(a.udp, &u, &p);
    let r = c.allocate();
    assert_eq!(r.code(), Some(300));
    assert_eq!(alternate_of(&r), Some(sibling.udp));

    // Draining (one allocation still held keeps it alive): a real client follows the 300.
    a.signal(libc::SIGTERM);
    a.wait_for_log("draining: new allocations refused");
    let port = a.udp.port().to_string();
    let out = run_tool(
        "turnutils_uclient",
        &[
            "-W",
            secret,
            "-u",
            "uclient",
            "-y",
            "-c",
            "-m",
            "1",
            "-n",
            "20",
            "-l",
            "100",
            "-z",
            "5",
            "-p",
            &port,
            "127.0.0.1",
        ],
        60,
    );
    assert!(
        out.contains("error 300"),
        "uclient saw the redirect:\n{out}"
    );
    assert_eq!(common::lost_packets(&out), 0, "{out}");
    // The sibling held its allocations (the draining relay none but the first).
    let (ok, list) = admin(&sibling, &["allocations", "--user", "uclient"]);
    let on_sibling = list.matches("\"user_id\": \"uclient\"").count()
        + sessions(&sibling)
            .iter()
            .filter(|s| s["user_id"] == "uclient")
            .count();
    assert!(
        ok && on_sibling >= 2,
        "the sibling served uclient's allocations:\n{list}\n{out}"
    );
    assert!(
        !sessions(&a).iter().any(|s| s["user_id"] == "uclient"),
        "the draining relay allocated nothing for uclient"
    );
}

/// With no configured sibling, a full relay sends clients to the relay that publishes its
/// addresses and load in the store they share (here one SQLite file, two relays).
#[test]
fn a_full_relay_picks_the_sibling_that_publishes_its_load_in_the_store() {
    let dir = temp_dir("published");
    let store = format!("sqlite:{}", dir.join("fleet.db").display());
    let _b = relay(
        &dir,
        "b",
        &store,
        "[redirect]\nadvertise = { udp = [\"127.0.0.2:3478\"] }\n",
        &[],
    );
    let a = relay(&dir, "a", &store, "[redirect]\nmax_allocations = 1\n", &[]);
    let secret = "the-top-level-secret-0123456789";
    let (_held, _) = allocate_when_accepted(a.udp, secret, "first", 10);
    let (u, p) = credentials(secret, "second");
    let want: SocketAddr = "127.0.0.2:3478".parse().expect("addr");
    wait_until(15, "a never named the published sibling", || {
        let mut c = RawClient::new(a.udp, &u, &p);
        let r = c.allocate();
        r.code() == Some(300) && alternate_of(&r) == Some(want)
    });
    let _ = std::fs::remove_dir_all(&dir);
}

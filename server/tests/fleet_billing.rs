//! What a vendor bills from and runs its fleet on, each checked against a real store: usage
//! counted once when a flush fails partway, and kept on disk across a restart while the
//! database is down; RFC 6062 allocations' bytes in their records; relaying that goes on
//! while nobody reads the session records; a relay that starts with the database down
//! serving the copy it saved (and not ready without one); no password in any log line; the
//! database refusing tenants that clash, written at once on two relays; a delete cut halfway
//! leaving the tenant whole; admin names with spaces, `/`, `:` and `@`; wrong admin keys
//! limited; the admin API on a listener of its own; and one relay answering for the fleet's
//! allocations.

mod common;

use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::fleet::{
    admin, allocate_when_accepted, credentials, relay, sessions, temp_dir, wait_until, Postgres,
    KEY,
};
use common::{lost_packets, run_tool, RawClient};
use turnpike_proto::stun::{attr, method};

const SECRET: &str = "the-top-level-secret-0123456789";

/// Relays `n` ChannelData datagrams of `size` bytes to a fresh peer, then releases the
/// allocation.
fn relay_and_release(c: &mut RawClient, server: std::net::SocketAddr, n: usize, size: usize) {
    let peer = UdpSocket::bind("127.0.0.1:0").expect("peer");
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
    let mut buf = vec![0u8; size + 16];
    for _ in 0..n {
        let mut frame = vec![0x40, 0x00];
        frame.extend_from_slice(&(size as u16).to_be_bytes());
        frame.extend(std::iter::repeat_n(7u8, size));
        c.sock.send_to(&frame, server).expect("send");
        assert_eq!(peer.recv_from(&mut buf).expect("relayed").0, size);
    }
    assert_eq!(
        c.request(method::REFRESH, |b| {
            b.u32(attr::LIFETIME, 0);
        })
        .code(),
        None
    );
}

/// The usage rows of `tenant` in the PostgreSQL store: (sessions, bytes up) summed.
fn pg_usage(pg: &Postgres, tenant: &str) -> (i64, i64) {
    let out = pg.sql(&format!(
        "SELECT coalesce(sum(sessions), 0) || ' ' || coalesce(sum(bytes_up), 0) FROM usage WHERE tenant = '{tenant}'"
    ));
    let mut it = out
        .split_whitespace()
        .map(|v| v.parse::<i64>().expect("number"));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// Nothing of `dir`'s relay `name` waits to be written: its spool file says so.
fn spool_empty(dir: &std::path::Path, name: &str) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join(format!("{name}-state/usage-spool.json")))
    else {
        return false;
    };
    let v: serde_json::Value = serde_json::from_str(&text).expect("spool");
    v["flushing"].is_null() && v["open"].as_array().is_some_and(|o| o.is_empty())
}

/// A flush the database refuses partway (a trigger refuses one tenant's row) writes nothing
/// and is retried as a whole; once the database takes it, each session counts exactly once.
#[test]
fn a_flush_that_fails_partway_counts_every_session_once() {
    let dir = temp_dir("partway");
    let pg = Postgres::start(&dir.join("db"));
    let r = relay(&dir, "relay", &pg.url(), "", &[]);
    wait_until(20, "store up", || r.metric("turnpike_store_up") == 1.0);
    for (t, secret) in [
        ("good", "good-secret-0123456789ab"),
        ("bad", "bad-secret-0123456789abc"),
    ] {
        let (ok, out) = admin(
            &r,
            &[
                "add-tenant",
                t,
                "--realm",
                &format!("{t}.test"),
                "--secret",
                secret,
            ],
        );
        assert!(ok, "{out}");
    }
    pg.sql(
        "CREATE FUNCTION refuse_bad() RETURNS trigger AS $$ BEGIN \
           IF NEW.tenant = 'bad' THEN RAISE EXCEPTION 'refused for the test'; END IF; \
           RETURN NEW; END $$ LANGUAGE plpgsql; \
         CREATE TRIGGER refuse_bad BEFORE INSERT OR UPDATE ON usage \
           FOR EACH ROW EXECUTE FUNCTION refuse_bad();",
    );
    let (mut good, _) = allocate_when_accepted(r.udp, "good-secret-0123456789ab", "g", 10);
    let (mut bad, _) = allocate_when_accepted(r.udp, "bad-secret-0123456789abc", "b", 10);
    relay_and_release(&mut good, r.udp, 3, 100);
    relay_and_release(&mut bad, r.udp, 1, 50);
    // Flushes fail (the relay says so) and leave nothing behind, not even good's row.
    wait_until(20, "a refused flush", || {
        r.log_text()
            .contains("usage not written; kept for the next try")
    });
    let refused = r.log_text().matches("usage not written").count();
    wait_until(20, "another refused flush", || {
        r.log_text().matches("usage not written").count() >= refused + 2
    });
    assert_eq!(pg_usage(&pg, "good"), (0, 0), "a refused flush wrote a row");
    // The database takes it again: every session once, however many tries it took.
    pg.sql("DROP TRIGGER refuse_bad ON usage");
    wait_until(20, "usage written", || spool_empty(&dir, "relay"));
    assert_eq!(pg_usage(&pg, "good"), (1, 300));
    assert_eq!(pg_usage(&pg, "bad"), (1, 50));
}

/// Usage the relay could not write when it stopped (the database down) waits on disk and is
/// written, once, by the next start.
#[test]
fn usage_waits_on_disk_across_a_restart_while_the_database_is_down() {
    let dir = temp_dir("spool");
    let pg = Postgres::start(&dir.join("db"));
    let mut r = relay(&dir, "relay", &pg.url(), "", &[]);
    wait_until(20, "store up", || r.metric("turnpike_store_up") == 1.0);
    let (ok, out) = admin(
        &r,
        &[
            "add-tenant",
            "acme",
            "--realm",
            "acme.test",
            "--secret",
            "acme-secret-0123456789ab",
        ],
    );
    assert!(ok, "{out}");
    let (mut c, _) = allocate_when_accepted(r.udp, "acme-secret-0123456789ab", "u", 10);
    pg.stop();
    wait_until(20, "store down", || r.metric("turnpike_store_up") == 0.0);
    relay_and_release(&mut c, r.udp, 2, 100);
    wait_until(20, "spooled", || {
        std::fs::read_to_string(dir.join("relay-state/usage-spool.json"))
            .is_ok_and(|t| t.contains("\"acme\""))
    });
    r.signal(libc::SIGTERM);
    assert!(r.wait_exit(30).success());
    pg.run();
    let again = relay(&dir, "relay", &pg.url(), "", &[]);
    again.wait_for_log("usage not yet in the store, kept from the last run");
    wait_until(30, "written by the next start", || {
        spool_empty(&dir, "relay")
    });
    assert_eq!(pg_usage(&pg, "acme"), (1, 200));
}

/// RFC 6062 TCP allocations count the bytes their data connections carried: in their session
/// records and in the usage.
#[test]
fn tcp_allocations_record_their_bytes() {
    let dir = temp_dir("rfc6062");
    let r = relay(
        &dir,
        "relay",
        &format!("sqlite:{}", dir.join("store.db").display()),
        "",
        &["--listen", "tcp://127.0.0.1:0", "--drain-grace", "5"],
    );
    let tcp = r.addr_of("tcp").port().to_string();
    let out = run_tool(
        "turnutils_uclient",
        &[
            "-T",
            "-y",
            "-W",
            SECRET,
            "-u",
            "tcpuser",
            "-p",
            &tcp,
            "-m",
            "1",
            "-n",
            "50",
            "-l",
            "120",
            "127.0.0.1",
        ],
        60,
    );
    assert_eq!(lost_packets(&out), 0, "{out}");
    wait_until(20, "records of the RFC 6062 allocations", || {
        sessions(&r)
            .iter()
            .filter(|s| s["transport"] == "tcp (RFC 6062)")
            .count()
            >= 2
    });
    let tcp_records: Vec<_> = sessions(&r)
        .into_iter()
        .filter(|s| s["transport"] == "tcp (RFC 6062)")
        .collect();
    let up: u64 = tcp_records
        .iter()
        .map(|s| s["bytes_up"].as_u64().unwrap_or(0))
        .sum();
    let down: u64 = tcp_records
        .iter()
        .map(|s| s["bytes_down"].as_u64().unwrap_or(0))
        .sum();
    // Two allocations, each sending 50 x 120 bytes to the other: 6000 up each, 6000 down.
    assert_eq!((up, down), (12_000, 12_000), "{tcp_records:?}");
    wait_until(20, "usage", || {
        let (_, out) = admin(&r, &["usage"]);
        out.contains("\"bytes_up\": 12000")
    });
}

/// Relaying goes on while nobody reads the relay's stdout: session records wait for their
/// writer (or are dropped and counted), never the shard.
#[test]
fn relaying_goes_on_while_nobody_reads_the_session_records() {
    let dir = temp_dir("stalled-stdout");
    let config = dir.join("relay.toml");
    std::fs::write(
        &config,
        format!("[auth]\nsecrets = [\"{SECRET}\"]\n[peer]\nallow = [\"127.0.0.0/8\"]\n"),
    )
    .expect("config");
    // stdout is a pipe the test never reads (64 KiB fill it); the log goes to stderr.
    let mut child = Command::new(common::relay_binary())
        .args([
            "--listen",
            "udp://127.0.0.1:0",
            "--relay-ip",
            "127.0.0.1",
            "--threads",
            "1",
        ])
        .args([
            "--metrics-listen",
            "127.0.0.1:0",
            "--config",
            config.to_str().expect("path"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("relay");
    let mut err = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut udp = None;
    let mut line = String::new();
    while udp.is_none() {
        line.clear();
        assert!(
            std::io::BufRead::read_line(&mut err, &mut line).expect("log") > 0,
            "exited"
        );
        if let Some(a) = line.split("listening on udp://").nth(1) {
            udp = a.trim().parse::<std::net::SocketAddr>().ok();
        }
    }
    let udp = udp.expect("udp");
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    let _guard = common::Child2(child);
    // 400 sessions' records (about 100 KiB) are more than the pipe holds.
    let (u, p) = credentials(SECRET, "many");
    for _ in 0..400 {
        let mut c = RawClient::new(udp, &u, &p);
        assert_eq!(c.allocate().code(), None);
        assert_eq!(
            c.request(method::REFRESH, |b| {
                b.u32(attr::LIFETIME, 0);
            })
            .code(),
            None
        );
    }
    // And the shard still relays.
    let mut c = RawClient::new(udp, &u, &p);
    assert_eq!(c.allocate().code(), None);
    relay_and_release(&mut c, udp, 3, 100);
}

/// A relay whose database is down at start serves the snapshot it saved when it last read
/// it (ready, saying so), and the store's tenants authenticate; without a saved copy it is
/// not ready, and says why.
#[test]
fn a_relay_starting_with_the_database_down_serves_its_saved_copy_or_is_not_ready() {
    let dir = temp_dir("cold-start");
    let pg = Postgres::start(&dir.join("db"));
    let mut r = relay(&dir, "relay", &pg.url(), "", &[]);
    wait_until(20, "store up", || r.metric("turnpike_store_up") == 1.0);
    let (ok, out) = admin(
        &r,
        &[
            "add-tenant",
            "acme",
            "--realm",
            "acme.test",
            "--secret",
            "acme-secret-0123456789ab",
        ],
    );
    assert!(ok, "{out}");
    wait_until(20, "the copy saved", || {
        std::fs::read_to_string(dir.join("relay-state/store-snapshot.json"))
            .is_ok_and(|t| t.contains("\"acme\""))
    });
    r.signal(libc::SIGTERM);
    assert!(r.wait_exit(30).success());
    pg.stop();

    let again = relay(&dir, "relay", &pg.url(), "", &[]);
    wait_until(20, "ready from the saved copy", || {
        again.http_get("/readyz").0 == 200
    });
    let (_, body) = again.http_get("/readyz");
    assert!(body.contains("serving the copy saved on disk"), "{body}");
    let _ = allocate_when_accepted(again.udp, "acme-secret-0123456789ab", "u", 10);

    // Another relay, which never read the store: not ready, and why.
    let fresh = relay(&dir, "fresh", &pg.url(), "", &[]);
    wait_until(20, "store reported down", || {
        fresh.metric("turnpike_store_up") == 0.0
    });
    let (status, body) = fresh.http_get("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("not read yet") && body.contains("no copy saved"),
        "{body}"
    );
}

/// A connection string's password appears in no log line, in libpq's keyword form and in a
/// URL's query string.
#[test]
fn no_form_of_the_connection_string_puts_its_password_in_the_log() {
    let dir = temp_dir("redact");
    let pg = Postgres::start(&dir.join("db"));
    // The test's server trusts every local connection: the password is there to be hidden.
    let keyword = format!("{} password=s3cret-in-keyword", pg.url());
    let r = relay(&dir, "kw", &keyword, "", &[]);
    wait_until(20, "store up", || r.metric("turnpike_store_up") == 1.0);
    let log = r.log_text();
    assert!(
        log.contains("password=***") && !log.contains("s3cret"),
        "{log}"
    );
    let check = Command::new(common::relay_binary())
        .args(["--store", &keyword, "--check-config"])
        .output()
        .expect("check");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(!printed.contains("s3cret"), "{printed}");
    // A store that does not answer: the retry warnings hide it too.
    let down = relay(
        &dir,
        "down",
        "postgres://turnpike@127.0.0.1:1/fleet?password=s3cret-in-query",
        "",
        &[],
    );
    down.wait_for_log("store unreachable");
    let log = down.log_text();
    assert!(
        log.contains("password=***") && !log.contains("s3cret"),
        "{log}"
    );
}

/// Two relays take clashing tenants (one realm) at the same moment: the database lets one in,
/// every time; a delete that fails halfway (a trigger refuses the revocations' delete) leaves
/// the tenant whole, users and all.
#[test]
fn the_database_refuses_clashes_and_half_deletes() {
    let dir = temp_dir("clash");
    let pg = Postgres::start(&dir.join("db"));
    let a = relay(&dir, "relay-a", &pg.url(), "", &[]);
    let b = relay(&dir, "relay-b", &pg.url(), "", &[]);
    for r in [&a, &b] {
        wait_until(20, "store up", || r.metric("turnpike_store_up") == 1.0);
    }
    for round in 0..6 {
        let realm = format!("clash{round}.test");
        let go = std::sync::Arc::new(std::sync::Barrier::new(2));
        let (ma, mb) = (a.metrics, b.metrics);
        let ask = |metrics: std::net::SocketAddr, name: String| {
            let (go, realm) = (std::sync::Arc::clone(&go), realm.clone());
            std::thread::spawn(move || {
                go.wait();
                Command::new(common::relay_binary())
                    .args(["admin", "--url", &format!("http://{metrics}"), "--key", KEY])
                    .args(["add-tenant", &name, "--realm", &realm, "--secret"])
                    .arg(format!("{name}-secret-0123456789"))
                    .output()
                    .expect("admin")
            })
        };
        let ta = ask(ma, format!("t{round}a"));
        let tb = ask(mb, format!("t{round}b"));
        let outs = [ta.join().expect("a"), tb.join().expect("b")];
        let ok = outs.iter().filter(|o| o.status.success()).count();
        let texts: Vec<String> = outs
            .iter()
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .collect();
        assert_eq!(ok, 1, "round {round}: {texts:?}");
        assert_eq!(
            pg.sql(&format!(
                "SELECT count(*) FROM tenant_keys WHERE kind = 'realm' AND value = '{realm}'"
            )),
            "1"
        );
    }
    // A delete refused halfway: the tenant keeps its users.
    let (ok, out) = admin(
        &a,
        &[
            "add-tenant",
            "keep",
            "--realm",
            "keep.test",
            "--secret",
            "keep-secret-0123456789",
        ],
    );
    assert!(ok, "{out}");
    let (ok, out) = admin(&a, &["put-user", "keep", "alice", "--password", "pw"]);
    assert!(ok, "{out}");
    pg.sql(
        "CREATE FUNCTION refuse_delete() RETURNS trigger AS $$ BEGIN \
           RAISE EXCEPTION 'refused for the test'; END $$ LANGUAGE plpgsql; \
         CREATE TRIGGER refuse_delete BEFORE DELETE ON revocations \
           FOR EACH STATEMENT EXECUTE FUNCTION refuse_delete();",
    );
    let (ok, out) = admin(&a, &["delete-tenant", "keep"]);
    assert!(!ok, "{out}");
    assert_eq!(
        pg.sql("SELECT count(*) FROM tenants WHERE name = 'keep'"),
        "1"
    );
    assert_eq!(
        pg.sql("SELECT count(*) FROM users WHERE tenant = 'keep'"),
        "1"
    );
    pg.sql("DROP TRIGGER refuse_delete ON revocations");
    let (ok, out) = admin(&a, &["delete-tenant", "keep"]);
    assert!(ok, "{out}");
    assert_eq!(
        pg.sql("SELECT count(*) FROM users WHERE tenant = 'keep'"),
        "0"
    );
    assert_eq!(
        pg.sql("SELECT count(*) FROM tenant_keys WHERE tenant = 'keep'"),
        "0"
    );
}

/// Names with spaces, `/`, `:` and `@` go through the CLI and the API whole; an unknown
/// allocation is 404; wrong keys get 401, then 429.
#[test]
fn admin_names_whole_404s_and_limited_wrong_keys() {
    let dir = temp_dir("names");
    let r = relay(
        &dir,
        "relay",
        &format!("sqlite:{}", dir.join("s.db").display()),
        "",
        &[],
    );
    let (ok, out) = admin(
        &r,
        &[
            "add-tenant",
            "acme",
            "--realm",
            "acme.test",
            "--secret",
            "acme-secret-0123456789",
        ],
    );
    assert!(ok, "{out}");
    for user in ["john doe", "a/b@c:d", "50%+off"] {
        let (ok, out) = admin(&r, &["put-user", "acme", user, "--password", "pw"]);
        assert!(ok, "{user}: {out}");
        let (_, list) = admin(&r, &["tenants"]);
        assert!(list.contains(&format!("\"{user}\"")), "{user}: {list}");
        let (ok, out) = admin(&r, &["delete-user", "acme", user]);
        assert!(ok, "{user}: {out}");
    }
    let revoked = "1700000000:bob smith";
    let (ok, out) = admin(&r, &["revoke", "acme", revoked]);
    assert!(ok, "{out}");
    let (_, list) = admin(&r, &["tenants"]);
    assert!(list.contains(revoked), "{list}");
    let (ok, out) = admin(&r, &["unrevoke", "acme", revoked]);
    assert!(ok, "{out}");
    let (_, list) = admin(&r, &["tenants"]);
    assert!(!list.contains(revoked), "{list}");

    let (ok, out) = admin(&r, &["end", "0.99.0"]);
    assert!(!ok && out.contains("404"), "{out}");

    let (code, body) = common::http_get(r.metrics, "/v1/admin/tenants");
    assert!(
        code == 401 && body.contains("an admin key is needed"),
        "no key: {code} {body}"
    );
    let wrong = |n: usize| {
        Command::new(common::relay_binary())
            .args(["admin", "--url", &format!("http://{}", r.metrics), "--key"])
            .arg(format!("wrong-{n}"))
            .arg("tenants")
            .output()
            .expect("admin")
    };
    let codes: Vec<String> = (0..4)
        .map(|n| String::from_utf8_lossy(&wrong(n).stderr).into_owned())
        .collect();
    assert!(
        codes[0].contains("401") && codes[0].contains("wrong admin key"),
        "{codes:?}"
    );
    assert!(codes[3].contains("429"), "{codes:?}");
}

/// `[admin] listen`: the API answers on its own listener, and no longer on the metrics one.
#[test]
fn the_admin_api_answers_where_the_operator_says() {
    let dir = temp_dir("admin-listen");
    let r = relay(
        &dir,
        "relay",
        &format!("sqlite:{}", dir.join("s.db").display()),
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
        &[],
    );
    let line = r.wait_for_log("admin API on http://");
    let url = line
        .split("admin API on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("url")
        .trim_end_matches("/v1/admin/")
        .to_owned();
    let out = Command::new(common::relay_binary())
        .args(["admin", "--url", &url, "--key", KEY, "tenants"])
        .output()
        .expect("admin");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(r.http_get("/v1/admin/tenants").0, 404);
}

/// One relay answers for the fleet: every relay publishing its admin address lists its
/// allocations, each naming its relay; a relay that does not answer is named.
#[test]
fn one_relay_lists_the_fleets_allocations() {
    let dir = temp_dir("fleet-view");
    let store = format!("sqlite:{}", dir.join("fleet.db").display());
    let conf = |port: u16| {
        format!("[admin]\nlisten = \"127.0.0.1:{port}\"\nadvertise = \"http://127.0.0.1:{port}\"\n")
    };
    let (pa, pb) = (common::free_port(), common::free_port());
    let a = relay(&dir, "relay-a", &store, &conf(pa), &[]);
    let mut b = relay(&dir, "relay-b", &store, &conf(pb), &[]);
    let (_ca, _) = allocate_when_accepted(a.udp, SECRET, "on-a", 10);
    let (_cb, _) = allocate_when_accepted(b.udp, SECRET, "on-b", 10);
    let list = |port: u16| -> serde_json::Value {
        let out = Command::new(common::relay_binary())
            .args([
                "admin",
                "--url",
                &format!("http://127.0.0.1:{port}"),
                "--key",
                KEY,
            ])
            .args(["allocations", "--fleet"])
            .output()
            .expect("admin");
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    };
    wait_until(20, "both relays listed", || {
        let v = list(pa);
        let all = v["allocations"].as_array().cloned().unwrap_or_default();
        all.iter()
            .any(|x| x["relay"] == "relay-a" && x["user_id"] == "on-a")
            && all
                .iter()
                .any(|x| x["relay"] == "relay-b" && x["user_id"] == "on-b")
    });
    b.signal(libc::SIGKILL);
    let _ = b.wait_exit(10);
    let v = list(pa);
    let unanswered = v["unanswered"].as_array().cloned().unwrap_or_default();
    assert!(unanswered.iter().any(|u| u["name"] == "relay-b"), "{v}");
    assert!(v["allocations"]
        .as_array()
        .is_some_and(|all| all.iter().any(|x| x["user_id"] == "on-a")));
}

/// The store speaks TLS to PostgreSQL as libpq's `sslmode` says: `require` encrypts (the
/// server sees a TLS connection), `verify-full` checks the certificate against `sslrootcert`
/// and the host name, and refuses a server whose certificate is for another name.
#[test]
fn the_store_speaks_tls_to_postgresql() {
    let dir = temp_dir("pg-tls");
    let cert = common::TestCert::new("pg-tls", &["localhost"]);
    let port = common::free_port();
    let pg = Postgres::start_tls(&dir.join("db"), &cert, port);
    let url = |host: &str, tls: &str| {
        format!("host={host} port={port} user=postgres dbname=postgres {tls}")
    };
    let root = format!("sslrootcert={}", cert.cert.display());
    let require = relay(
        &dir,
        "require",
        &url("127.0.0.1", "sslmode=require"),
        "",
        &[],
    );
    wait_until(20, "store up over TLS", || {
        require.metric("turnpike_store_up") == 1.0
    });
    assert_ne!(
        pg.sql(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE s.ssl AND a.client_addr = '127.0.0.1'"
        ),
        "0",
        "no TLS connection from the relay"
    );
    let full = relay(
        &dir,
        "full",
        &url("localhost", &format!("sslmode=verify-full {root}")),
        "",
        &[],
    );
    wait_until(20, "store up, certificate checked", || {
        full.metric("turnpike_store_up") == 1.0
    });
    // 127.0.0.1 is not a name the certificate carries.
    let wrong = relay(
        &dir,
        "wrong-name",
        &url("127.0.0.1", &format!("sslmode=verify-full {root}")),
        "",
        &[],
    );
    let line = wrong.wait_for_log("store unreachable");
    assert!(line.to_lowercase().contains("certificate"), "{line}");
    assert_eq!(wrong.metric("turnpike_store_up"), 0.0);
}

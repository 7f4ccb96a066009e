//! Fleet operations end to end: tenants in a real store (SQLite files, and a PostgreSQL server
//! the test starts on a private socket directory), changed through `turnpike admin`, honoured
//! by running relays; revocation ending live allocations on every relay; the relays going on
//! when the database stops; session records whose byte counts match what the client sent;
//! and a draining or full relay sending a real client (coturn's `turnutils_uclient`, which
//! follows ALTERNATE-SERVER) to its sibling with 300 Try Alternate.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;

use std::time::Duration;

use common::fleet::{
    admin, allocate_when_accepted, alternate_of, credentials, relay, sessions, temp_dir,
    wait_until, Postgres,
};
use common::{run_tool, RawClient};
use turnpike_proto::stun::{attr, method};

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
    // The store change was heard at once, from the write itself, not at the 30 s poll.
    assert!(
        r.log_text()
            .lines()
            .any(|l| l.contains("store snapshot loaded")
                && l.contains("cause=\"written here\"")
                && l.contains("tenants=1")),
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
    // Relay b heard of the change from the database's NOTIFY, not its 30 s poll.
    assert!(
        b.log_text()
            .lines()
            .any(|l| l.contains("store snapshot loaded")
                && l.contains("cause=\"notified\"")
                && l.contains("tenants=1")),
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

/// Allocates at once from `n` clients of distinct users: the answers' codes (None: allocated).
fn allocate_at_once(server: SocketAddr, secret: &str, n: usize) -> Vec<Option<u16>> {
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let barrier = std::sync::Arc::clone(&barrier);
            let secret = secret.to_owned();
            std::thread::spawn(move || {
                let (u, p) = credentials(&secret, &format!("burst{i}"));
                let mut c = RawClient::new(server, &u, &p);
                // Learn the nonce first, so the Allocates that race are signed ones.
                let _ = c.request(turnpike_proto::stun::method::BINDING, |_| {});
                barrier.wait();
                let code = c.allocate().code();
                // Keep the allocation while the others are answered.
                std::thread::sleep(Duration::from_millis(300));
                code
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("client"))
        .collect()
}

/// `[redirect] max_allocations` holds at the allocation that reaches it however fast they
/// come; a full relay whose only sibling is a configured one refuses the rest (508: static
/// siblings take clients only while it drains); draining, it sends them there, and coturn's
/// uclient follows the 300 and relays through the sibling with nothing lost, while the
/// draining relay allocates nothing for it.
#[test]
fn a_full_relay_refuses_without_a_sibling_with_room_and_a_draining_one_redirects() {
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
    let codes = allocate_at_once(a.udp, secret, 4);
    assert_eq!(
        codes.iter().filter(|c| c.is_none()).count(),
        1,
        "one allocation at the limit of 1: {codes:?}"
    );
    assert!(codes.iter().flatten().all(|c| *c == 508), "{codes:?}");
    // The one allocated lives on (its lifetime), holding the relay full.
    let (u, p) = credentials(secret, "second");
    assert_eq!(RawClient::new(a.udp, &u, &p).allocate().code(), Some(508));
    assert_eq!(a.metric("turnpike_redirecting"), 0.0);
    let made = a.metric("turnpike_allocations_total");

    // Draining (one allocation still held keeps it alive): a real client follows the 300.
    a.signal(libc::SIGTERM);
    a.wait_for_log("draining: new allocations refused");
    wait_until(10, "redirecting while draining", || {
        a.metric("turnpike_redirecting") == 1.0
    });
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
    assert_eq!(
        a.metric("turnpike_allocations_total"),
        made,
        "the draining relay allocated for uclient"
    );
}

/// A relay never sends a client to itself: a configured sibling that is one of its own
/// listeners is passed over, and the draining relay answers 508.
#[test]
fn a_relay_never_redirects_to_itself() {
    let dir = temp_dir("self");
    let port = common::free_port();
    let listen = format!("udp://127.0.0.1:{port}");
    let a = relay(
        &dir,
        "a",
        &format!("sqlite:{}", dir.join("a.db").display()),
        &format!("[redirect]\nsiblings = [{{ udp = [\"127.0.0.1:{port}\"] }}]\n"),
        &["--listen", &listen, "--drain-grace", "60"],
    );
    let secret = "the-top-level-secret-0123456789";
    let (_held, _) = allocate_when_accepted(a.udp, secret, "first", 10);
    a.signal(libc::SIGTERM);
    a.wait_for_log("draining: new allocations refused");
    let (u, p) = credentials(secret, "second");
    let r = RawClient::new(a.udp, &u, &p).allocate();
    assert_eq!((r.code(), alternate_of(&r)), (Some(508), None));
}

/// Two full relays of one store (each publishes its load) send no client to each other:
/// each answers 508 itself, so a client is never sent in a circle.
#[test]
fn two_full_relays_answer_508_rather_than_send_clients_back_and_forth() {
    let dir = temp_dir("two-full");
    let store = format!("sqlite:{}", dir.join("fleet.db").display());
    let (pa, pb) = (common::free_port(), common::free_port());
    let conf = |p: u16| {
        format!("[redirect]\nmax_allocations = 1\nadvertise = {{ udp = [\"127.0.0.1:{p}\"] }}\n")
    };
    let listen = |p: u16| format!("udp://127.0.0.1:{p}");
    let (la, lb) = (listen(pa), listen(pb));
    let a = relay(
        &dir,
        "a",
        &store,
        &conf(pa),
        &["--listen", &la, "--drain-grace", "5"],
    );
    let b = relay(
        &dir,
        "b",
        &store,
        &conf(pb),
        &["--listen", &lb, "--drain-grace", "5"],
    );
    let secret = "the-top-level-secret-0123456789";
    // While b has room, a full a sends clients there.
    let (_on_a, _) = allocate_when_accepted(a.udp, secret, "first-a", 10);
    let (u, p) = credentials(secret, "next");
    let b_published = SocketAddr::from(([127, 0, 0, 1], pb));
    wait_until(15, "a redirected to b while b had room", || {
        let r = RawClient::new(a.udp, &u, &p).allocate();
        r.code() == Some(300) && alternate_of(&r) == Some(b_published)
    });
    // Both full: neither names the other once the store says so.
    let (_on_b, _) = allocate_when_accepted(b.udp, secret, "first-b", 10);
    wait_until(15, "both answer 508", || {
        [&a, &b].iter().all(|r| {
            let x = RawClient::new(r.udp, &u, &p).allocate();
            x.code() == Some(508) && alternate_of(&x).is_none()
        })
    });
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

/// A Allocate over `tls`, signed with MESSAGE-INTEGRITY-SHA256 (`sha256`) or -SHA1, after the
/// 401 that gives the nonce: the answer.
async fn tls_allocate<S>(tls: &mut S, user: &str, password: &str, sha256: bool) -> common::Response
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use turnpike_proto::stun::{Builder, Class, TransactionId, MAGIC_COOKIE};
    let tid = |n: u8| {
        let mut t = [n; 16];
        t[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        TransactionId(t)
    };
    let mut first = Vec::new();
    Builder::new(&mut first, Class::Request, method::ALLOCATE, tid(1))
        .u32(attr::REQUESTED_TRANSPORT, 17 << 24)
        .fingerprint();
    let challenge = common::stream_exchange(tls, &first).await;
    assert_eq!(challenge.code(), Some(401));
    let (nonce, realm) = {
        let m = challenge.msg();
        (
            m.get(attr::NONCE).expect("nonce").to_vec(),
            String::from_utf8_lossy(m.get(attr::REALM).expect("realm")).into_owned(),
        )
    };
    let mut req = Vec::new();
    let mut b = Builder::new(&mut req, Class::Request, method::ALLOCATE, tid(2));
    b.u32(attr::REQUESTED_TRANSPORT, 17 << 24)
        .attr(attr::USERNAME, user.as_bytes())
        .attr(attr::REALM, realm.as_bytes())
        .attr(attr::NONCE, &nonce);
    if sha256 {
        b.attr(
            attr::PASSWORD_ALGORITHMS,
            &turnpike_proto::auth::PASSWORD_ALGORITHMS,
        )
        .u32(attr::PASSWORD_ALGORITHM, 0x0002_0000)
        .integrity_sha256(&turnpike_proto::auth::long_term_key_sha256(
            user, &realm, password,
        ));
    } else {
        b.integrity_sha1(&turnpike_proto::auth::long_term_key(user, &realm, password));
    }
    b.fingerprint();
    common::stream_exchange(tls, &req).await
}

/// Over TLS a draining relay names its sibling's TLS address and, to a client that signs
/// with MESSAGE-INTEGRITY-SHA256 (so implements RFC 8489), ALTERNATE-DOMAIN: the name on the
/// sibling's certificate, another than its own. The client checks the sibling against that
/// name and allocates there. A client that signs with SHA-1 gets no ALTERNATE-DOMAIN.
#[tokio::test]
async fn a_tls_redirect_names_the_siblings_certificate_to_an_rfc_8489_client() {
    let dir = temp_dir("tls-redirect");
    let a_cert = common::TestCert::new("tls-redirect-a", &["a.test"]);
    let s_cert = common::TestCert::new("tls-redirect-s", &["sibling.test"]);
    let tls_flags = |c: &common::TestCert| {
        vec![
            "--listen".to_owned(),
            "tls://127.0.0.1:0".to_owned(),
            "--cert".to_owned(),
            c.cert.display().to_string(),
            "--key".to_owned(),
            c.key.display().to_string(),
            "--drain-grace".to_owned(),
            "60".to_owned(),
        ]
    };
    let flags = tls_flags(&s_cert);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let sibling = relay(
        &dir,
        "sibling",
        &format!("sqlite:{}", dir.join("s.db").display()),
        "",
        &flags,
    );
    let s_tls = sibling.addr_of("tls");
    let flags = tls_flags(&a_cert);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let a = relay(
        &dir,
        "a",
        &format!("sqlite:{}", dir.join("a.db").display()),
        &format!("[redirect]\nsiblings = [{{ tls = [\"{s_tls}\"], domain = \"sibling.test\" }}]\n"),
        &flags,
    );
    let secret = "the-top-level-secret-0123456789";
    let (_held, _) = allocate_when_accepted(a.udp, secret, "keep", 10);
    a.signal(libc::SIGTERM);
    a.wait_for_log("draining: new allocations refused");
    wait_until(10, "redirecting", || {
        a.metric("turnpike_redirecting") == 1.0
    });
    let mut roots = rustls::RootCertStore::empty();
    for c in [&a_cert, &s_cert] {
        roots
            .add(rustls::pki_types::CertificateDer::from(c.der.clone()))
            .expect("root");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let connect = |addr: SocketAddr, name: &'static str| {
        let connector = connector.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
            let name = rustls::pki_types::ServerName::try_from(name).expect("name");
            connector.connect(name, tcp).await.expect("TLS handshake")
        }
    };
    let (u, p) = credentials(secret, "redirected");
    let domain = |r: &common::Response| {
        r.msg()
            .get(attr::ALTERNATE_DOMAIN)
            .map(|d| String::from_utf8_lossy(d).into_owned())
    };
    let mut tls = connect(a.addr_of("tls"), "a.test").await;
    let r = tls_allocate(&mut tls, &u, &p, true).await;
    assert_eq!(r.code(), Some(300));
    let to = alternate_of(&r).expect("ALTERNATE-SERVER");
    assert_eq!((to, domain(&r)), (s_tls, Some("sibling.test".to_owned())));
    // As RFC 8489 §10 says: the sibling checked against ALTERNATE-DOMAIN, same credentials.
    let mut there = connect(to, "sibling.test").await;
    assert_eq!(tls_allocate(&mut there, &u, &p, true).await.code(), None);
    // An RFC 5389 client (SHA-1) gets the address, not the domain it would not understand.
    let mut old = connect(a.addr_of("tls"), "a.test").await;
    let r = tls_allocate(&mut old, &u, &p, false).await;
    assert_eq!((r.code(), domain(&r)), (Some(300), None));
}

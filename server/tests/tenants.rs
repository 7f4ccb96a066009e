//! Tenants on one relay: credentials that work only in their own tenant, quotas and metrics per
//! tenant, the credential service used end to end by independent clients (coturn's
//! `turnutils_uclient`, aioice), and revocation ending a live allocation.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use turnpike::config::ApiKeyHash;
use turnpike_proto::auth::ephemeral_password;
use turnpike_proto::stun::{attr, method, Builder, Class};

const ACME_KEY: &str = "acme-api-key-7f3a9c0e5b2d4f6a8c1e3b5d7f9a0c2e";
const GLOBEX_KEY: &str = "globex-api-key-0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e";

fn key_hash(key: &str) -> String {
    let h = ApiKeyHash::of(key);
    format!(
        "sha256:{}",
        h.0.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// Two tenants on UDP, TCP and TLS listeners, with a revocation file.
fn config(cert: &TestCert, revoked: &Path) -> String {
    format!(
        r#"
listen = ["udp://127.0.0.1:0", "tcp://127.0.0.1:0", "tls://127.0.0.1:0"]
relay_ips = ["127.0.0.1"]
realm = "relay.test"
threads = 2
drain_grace_secs = 1

[tls]
cert = "{cert}"
key = "{key}"

[auth]
revoked_file = "{revoked}"

[peer]
allow = ["127.0.0.0/8"]

[[tenant]]
name = "acme"
realm = "acme.test"
origins = ["https://app.acme.test"]
hostnames = ["turn.acme.test"]
users = [{{ name = "alice", password = "a-pass" }}]
secrets = ["acme-secret"]
api_keys = ["{acme_key}"]
credential_max_ttl_secs = 600
[tenant.quota]
allocations = 2

[[tenant]]
name = "globex"
realm = "globex.test"
origins = ["https://app.globex.test"]
hostnames = ["turn.globex.test"]
users = [{{ name = "bob", password = "b-pass" }}]
secrets = ["globex-secret"]
api_keys = ["{globex_key}"]
[tenant.quota]
allocations = 6
"#,
        cert = cert.cert.display(),
        key = cert.key.display(),
        revoked = revoked.display(),
        acme_key = key_hash(ACME_KEY),
        globex_key = key_hash(GLOBEX_KEY),
    )
}

struct Setup {
    relay: Relay,
    cert: TestCert,
    revoked: PathBuf,
}

fn start(name: &str) -> Setup {
    let cert = TestCert::new(name, &["turn.acme.test", "turn.globex.test", "127.0.0.1"]);
    let revoked = cert.dir.join("revoked");
    std::fs::write(&revoked, "# revoked users\n").expect("revoked file");
    let file = cert.dir.join("relay.toml");
    std::fs::write(&file, config(&cert, &revoked)).expect("config");
    let relay = Relay::spawn(&[
        "--config",
        file.to_str().expect("path"),
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    Setup {
        relay,
        cert,
        revoked,
    }
}

fn client(relay: &Relay, user: &str, password: &str, origin: Option<&str>) -> RawClient {
    let mut c = RawClient::new(relay.udp, user, password);
    c.origin = origin.map(str::to_owned);
    c
}

fn ephemeral(secret: &str, user: &str) -> (String, String) {
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 600;
    let username = format!("{expiry}:{user}");
    let password = ephemeral_password(secret, &username);
    (username, password)
}

/// `turnutils_uclient` client to client (one pair, no RTCP) with `args`, `packets` each way;
/// asserts nothing was lost.
fn uclient_loses_nothing(relay: SocketAddr, args: &[&str], packets: u32) {
    let (port, n) = (relay.port().to_string(), packets.to_string());
    let mut all = vec![
        "-y", "-c", "-p", &port, "-m", "1", "-n", &n, "-l", "120", "-z", "5",
    ];
    all.extend_from_slice(args);
    all.push("127.0.0.1");
    let out = run_tool("turnutils_uclient", &all, 60);
    assert_eq!(lost_packets(&out), 0, "{out}");
}

const ACME: Option<&str> = Some("https://app.acme.test");
const GLOBEX: Option<&str> = Some("https://app.globex.test");

#[tokio::test]
async fn tenants_keep_credentials_quotas_and_metrics_apart() {
    let s = start("tenants");
    let relay = &s.relay;

    // A tenant's static user, in its realm (named by ORIGIN).
    let mut alice = client(relay, "alice", "a-pass", ACME);
    assert_eq!(alice.allocate().code(), None, "alice allocates in acme");
    assert_eq!(alice.realm, "acme.test");
    // Her password is unknown in globex's realm, and bob's in acme's.
    let mut stray = client(relay, "alice", "a-pass", GLOBEX);
    assert_eq!(stray.allocate().code(), Some(401));
    assert_eq!(stray.realm, "globex.test");
    let mut stray = client(relay, "bob", "b-pass", ACME);
    assert_eq!(stray.allocate().code(), Some(401));
    // Ephemeral credentials of acme's secret are refused in globex's realm...
    let (user, pass) = ephemeral("acme-secret", "carol");
    let mut stray = client(relay, &user, &pass, GLOBEX);
    assert_eq!(stray.allocate().code(), Some(401));
    // ...and a request naming no tenant gets the relay realm, where no static user exists.
    let mut nowhere = client(relay, "alice", "a-pass", None);
    assert_eq!(nowhere.allocate().code(), Some(401));
    assert_eq!(nowhere.realm, "relay.test");

    // acme holds at most 2 allocations; globex is not affected by acme being full.
    let mut alice2 = client(relay, "alice", "a-pass", ACME);
    assert_eq!(alice2.allocate().code(), None);
    let mut alice3 = client(relay, "alice", "a-pass", ACME);
    assert_eq!(alice3.allocate().code(), Some(486), "acme's quota");
    let mut bob = client(relay, "bob", "b-pass", GLOBEX);
    assert_eq!(bob.allocate().code(), None, "globex has room");

    // The TLS SNI host name selects the tenant too.
    for (host, realm) in [
        ("turn.acme.test", "acme.test"),
        ("turn.globex.test", "globex.test"),
    ] {
        let tcp = tokio::net::TcpStream::connect(relay.addr_of("tls"))
            .await
            .expect("connect");
        let name = rustls::pki_types::ServerName::try_from(host.to_owned()).expect("name");
        let mut tls = s.cert.connector(&[]).connect(name, tcp).await.expect("tls");
        let mut c = RawClient::new(relay.udp, "bob", "b-pass");
        let r = c
            .request_on(&mut tls, method::ALLOCATE, |b| {
                b.u32(attr::REQUESTED_TRANSPORT, 17 << 24);
            })
            .await;
        assert_eq!(c.realm, realm, "{host}");
        let want = if realm == "globex.test" {
            None
        } else {
            Some(401)
        };
        assert_eq!(r.code(), want, "bob over TLS to {host}");
    }

    // An independent client, coturn's, in globex's realm through ORIGIN.
    uclient_loses_nothing(
        relay.udp,
        &["-o", "https://app.globex.test", "-u", "bob", "-w", "b-pass"],
        200,
    );

    // Metrics per tenant, never per user.
    let series = |s: &str| relay.metric(s);
    assert_eq!(series("turnpike_allocations_total{tenant=\"acme\"}"), 2.0);
    assert!(relay.wait_metric("turnpike_allocations_total{tenant=\"globex\"}", 4.0) >= 4.0);
    assert_eq!(
        series("turnpike_requests_total{method=\"allocate\",result=\"486\",tenant=\"acme\"}"),
        1.0
    );
    assert_eq!(
        series("turnpike_requests_total{method=\"allocate\",result=\"486\",tenant=\"globex\"}"),
        0.0
    );
    assert!(
        series("turnpike_auth_failures_total{reason=\"unknown_user\",tenant=\"globex\"}") >= 1.0
    );
    assert!(
        series("turnpike_relayed_packets_total{direction=\"client_to_peer\",tenant=\"globex\"}")
            >= 190.0
    );
    assert_eq!(
        series("turnpike_relayed_packets_total{direction=\"client_to_peer\",tenant=\"acme\"}"),
        0.0
    );
    assert_eq!(
        series("turnpike_tenant_allocations_active{tenant=\"acme\"}"),
        2.0
    );
    let (_, body) = relay.http_get("/metrics");
    for secret in ["alice", "bob", "a-pass", "acme-secret", "carol"] {
        assert!(!body.contains(secret), "{secret} in /metrics");
    }
}

/// `curl -k` POST to the credential service; (status, body, headers).
fn post(addr: SocketAddr, scheme: &str, key: Option<&str>, body: &str) -> (u16, String, String) {
    let url = format!("{scheme}://127.0.0.1:{}/v1/credentials", addr.port());
    let auth = key.map(|k| format!("Authorization: Bearer {k}"));
    let mut args = vec![
        "-sk",
        "-D",
        "/dev/stderr",
        "-w",
        "\n%{http_code}",
        "-X",
        "POST",
    ];
    if let Some(a) = &auth {
        args.extend(["-H", a.as_str()]);
    }
    args.extend(["-H", "Content-Type: application/json", "--data", body, &url]);
    let out = std::process::Command::new("curl")
        .args(&args)
        .output()
        .expect("curl (.ci/run installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').expect("status line");
    (
        code.trim().parse().expect("status"),
        body.to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_credential_service_hands_out_working_ice_servers() {
    let s = start("credsvc");
    let relay = &s.relay;
    let (udp, tcp, tls) = (relay.udp, relay.addr_of("tcp"), relay.addr_of("tls"));

    let (code, body, _) = post(
        tls,
        "https",
        Some(ACME_KEY),
        r#"{"user": "carol", "ttl": 100000}"#,
    );
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    let ice = &v["iceServers"][0];
    let urls: Vec<&str> = ice["urls"]
        .as_array()
        .expect("urls")
        .iter()
        .filter_map(|u| u.as_str())
        .collect();
    // acme names its host, so the URLs use it (its TLS SNI selects acme).
    assert_eq!(
        urls,
        [
            format!("turn:turn.acme.test:{}?transport=udp", udp.port()),
            format!("turn:turn.acme.test:{}?transport=tcp", tcp.port()),
            format!("turns:turn.acme.test:{}?transport=tcp", tls.port()),
        ]
    );
    assert_eq!(v["ttl"], 600, "capped at acme's credential_max_ttl_secs");
    let username = ice["username"].as_str().expect("username").to_owned();
    let password = ice["credential"].as_str().expect("credential").to_owned();
    assert!(username.ends_with(":carol"), "{username}");

    // aioice allocates with them over TLS and TCP (its TLS names no host, and it sends no
    // ORIGIN: acme's secret finds the tenant in the relay realm).
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/aioice_client.py");
    for (transport, addr) in [("tls", tls), ("tcp", tcp)] {
        let out = run_tool(
            "python3",
            &[
                script,
                "127.0.0.1",
                &addr.port().to_string(),
                transport,
                &username,
                &password,
                s.cert.cert.to_str().expect("path"),
                "20",
            ],
            60,
        );
        assert!(
            out.contains("\"sent\": 20, \"received\": 20"),
            "{transport}: {out}"
        );
    }
    // coturn's client over UDP with globex credentials from globex's key.
    let (code, body, _) = post(tls, "https", Some(GLOBEX_KEY), "");
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["ttl"], 3600);
    let (gu, gp) = (
        v["username"].as_str().expect("username").to_owned(),
        v["password"].as_str().expect("password").to_owned(),
    );
    uclient_loses_nothing(udp, &["-u", &gu, "-w", &gp], 100);
    assert!(relay.wait_metric("turnpike_allocations_total{tenant=\"acme\"}", 2.0) >= 2.0);
    assert!(relay.wait_metric("turnpike_allocations_total{tenant=\"globex\"}", 2.0) >= 2.0);

    // Plain HTTP is refused, a bad body is a 400; wrong or missing keys get 401 with a
    // Bearer challenge.
    assert_eq!(post(tcp, "http", Some(ACME_KEY), "").0, 403, "HTTPS only");
    assert_eq!(
        post(tls, "https", Some(ACME_KEY), r#"{"user": "x:y"}"#).0,
        400
    );
    let (code, body, headers) = post(tls, "https", Some("not-a-key"), "");
    assert_eq!(code, 401, "{body}");
    assert!(
        headers
            .to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{headers}"
    );
    assert_eq!(post(tls, "https", None, "").0, 401);
    // A source that keeps guessing is held back (the limit's exact timing is unit-tested).
    let held_back = (0..20).any(|_| post(tls, "https", Some("guess"), "").0 == 429);
    assert!(held_back, "wrong keys get 429 after a few");
    let log = relay.log_text();
    for secret in [
        ACME_KEY,
        GLOBEX_KEY,
        "guess",
        password.as_str(),
        gp.as_str(),
    ] {
        assert!(!log.contains(secret), "a key or password in the log");
    }
}

#[test]
fn revocation_ends_a_live_allocation_and_refuses_new_requests() {
    let s = start("revoke");
    let relay = &s.relay;
    let peer = UdpSocket::bind("127.0.0.1:0").expect("peer");
    peer.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let peer_addr = peer.local_addr().expect("addr");

    let (user, pass) = ephemeral("acme-secret", "carol");
    let mut carol = client(relay, &user, &pass, ACME);
    assert_eq!(carol.allocate().code(), None);
    let mut bob = client(relay, "bob", "b-pass", GLOBEX);
    assert_eq!(bob.allocate().code(), None);
    let send = |c: &mut RawClient, data: &[u8]| {
        let mut packet = Vec::new();
        Builder::new(&mut packet, Class::Indication, method::SEND, c.tid())
            .xor_address(attr::XOR_PEER_ADDRESS, peer_addr)
            .attr(attr::DATA, data)
            .fingerprint();
        c.sock.send_to(&packet, c.server).expect("send");
    };
    for c in [&mut carol, &mut bob] {
        let r = c.request(method::CREATE_PERMISSION, |b| {
            b.xor_address(attr::XOR_PEER_ADDRESS, peer_addr);
        });
        assert_eq!(r.code(), None);
    }
    let mut buf = [0u8; 64];
    // Resent a few times: a loaded machine may take its time, and UDP may drop.
    let relayed = (0..10).any(|_| {
        send(&mut carol, b"before");
        matches!(peer.recv_from(&mut buf), Ok((n, _)) if &buf[..n] == b"before")
    });
    assert!(relayed, "carol relays before the revocation");
    while peer.recv_from(&mut buf).is_ok() {}

    std::fs::write(&s.revoked, "acme carol\n").expect("revoke");
    let start = Instant::now();
    let gauge = "turnpike_tenant_allocations_active{tenant=\"acme\"}";
    while relay.metric(gauge) > 0.0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "allocation still held"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Files are checked four times a second and shards sweep four times a second, so this is
    // about half a second on a quiet machine; the loop above bounds it far below the
    // allocation's 600 s lifetime, which is what a revocation must beat.
    let took = start.elapsed();
    println!("revoked allocation ended {took:?} after the file changed");
    relay.wait_for_log("configuration reloaded");

    send(&mut carol, b"after");
    let relayed = (0..10).any(|_| {
        send(&mut bob, b"bob still relays");
        match peer.recv_from(&mut buf) {
            Ok((n, _)) => {
                assert_eq!(&buf[..n], b"bob still relays", "nothing of carol's");
                true
            }
            Err(_) => false,
        }
    });
    assert!(relayed, "bob relays after carol's revocation");
    assert_eq!(
        relay.metric("turnpike_tenant_allocations_active{tenant=\"globex\"}"),
        1.0
    );
    let mut again = client(relay, &user, &pass, ACME);
    assert_eq!(
        again.allocate().code(),
        Some(403),
        "revoked users are refused"
    );
    assert!(
        relay.wait_metric(
            "turnpike_auth_failures_total{reason=\"revoked\",tenant=\"acme\"}",
            1.0
        ) >= 1.0
    );
    // Nor does the credential service hand it new credentials.
    let tls = relay.addr_of("tls");
    assert_eq!(
        post(tls, "https", Some(ACME_KEY), r#"{"user": "carol"}"#).0,
        403
    );
    assert_eq!(
        post(tls, "https", Some(ACME_KEY), r#"{"user": "dave"}"#).0,
        200
    );
    // Another acme user is not affected.
    let (user, pass) = ephemeral("acme-secret", "dave");
    assert_eq!(client(relay, &user, &pass, ACME).allocate().code(), None);
}

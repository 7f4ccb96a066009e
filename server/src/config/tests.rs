//! Tests of the configuration: shipped files parse, errors name file, key and reason.

use super::*;
use clap::Parser;

fn load(text: &str) -> Result<Settings, Error> {
    let f = FileConfig::from_toml("test.toml", text)?;
    Settings::resolve(f, &Cli::default(), "test.toml".into())
}

#[test]
fn shipped_configs_parse() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../config");
    let mut n = 0;
    for entry in std::fs::read_dir(root).expect("config dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).expect("read");
            load(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 2, "default and example configs");
}

#[test]
fn embedded_default_is_safe() {
    let s = load(DEFAULT_TOML).expect("default parses");
    assert_eq!(
        s.listen
            .iter()
            .map(|l| (l.transport, l.addr))
            .collect::<Vec<_>>(),
        vec![(
            Transport::Udp,
            "0.0.0.0:3478".parse::<SocketAddr>().expect("a")
        )]
    );
    assert!(s.allow_peer.is_empty());
    assert!(s.generated_secret);
    assert_eq!(s.secrets.len(), 1);
    assert_eq!(s.secrets[0].0.len(), 48);
    assert_eq!(
        format!("{s:?}").matches(&s.secrets[0].0).count(),
        0,
        "secret hidden"
    );
}

#[test]
fn no_configuration_type_prints_a_secret() {
    let text = r#"
realm = "example.org"
listen = ["udp://127.0.0.1:0"]
[auth]
secrets = ["fleet-secret-value"]
users = [{ name = "alice", password = "alice-password-value" }]
[[tenant]]
name = "acme"
realm = "acme.example"
secrets = ["acme-secret-value"]
users = [{ name = "bob", password = "bob-password-value" }]
"#;
    let file = FileConfig::from_toml("test.toml", text).expect("parses");
    let settings = load(text).expect("resolves");
    let printed = format!("{file:?}\n{settings:?}\n{:?}", settings.tenants);
    for secret in [
        "fleet-secret-value",
        "alice-password-value",
        "acme-secret-value",
        "bob-password-value",
    ] {
        assert!(!printed.contains(secret), "{secret} printed:\n{printed}");
    }
    assert!(
        printed.contains("alice") && printed.contains("acme"),
        "{printed}"
    );
}

#[test]
fn errors_name_file_key_and_reason() {
    let e = load(
        "realm = \"x\"\nlisten = [\"udp://127.0.0.1:0\"]\n[peer]\nallow = [\"10.0.0.0/33\"]\n",
    )
    .expect_err("bad cidr")
    .to_string();
    assert!(
        e.contains("test.toml") && e.contains("peer.allow") && e.contains("10.0.0.0/33"),
        "{e}"
    );
    let e = load("listen = [\"udp://127.0.0.1:0\"]\n[quota]\ntotal = 3\n")
        .expect_err("unknown")
        .to_string();
    assert!(
        e.contains("test.toml") && e.contains("quota") && e.contains("unknown field `total`"),
        "{e}"
    );
    let e = load("listen = [\"udp://127.0.0.1:0\"]\nthreads = \"many\"\n")
        .expect_err("type")
        .to_string();
    assert!(e.contains("threads") && e.contains("line 2"), "{e}");
    let e = load("listen = [\"sctp://127.0.0.1:0\"]\n")
        .expect_err("scheme")
        .to_string();
    assert!(
        e.contains("listen") && e.contains("unsupported transport"),
        "{e}"
    );
    let e = load("listen = [\"tls://127.0.0.1:0\"]\n")
        .expect_err("no cert")
        .to_string();
    assert!(e.contains("tls.cert"), "{e}");
    let e = load("listen = [\"udp://127.0.0.1:0?proxy-protocol\"]\n")
        .expect_err("proxy on udp")
        .to_string();
    assert!(e.contains("proxy-protocol"), "{e}");
    let e = load("listen = [\"udp://127.0.0.1:0\"]\nrelay_ports = \"70000-2\"\n")
        .expect_err("ports")
        .to_string();
    assert!(e.contains("relay_ports"), "{e}");
}

#[test]
fn echo_is_off_by_default_and_takes_ports_and_ranges() {
    let s = load("listen = [\"udp://127.0.0.1:0\"]\n").expect("default");
    assert_eq!(s.echo.udp, vec![]);
    assert_eq!(s.echo.tcp, vec![]);
    assert!(!s.echo.http());
    assert_eq!(
        (s.echo.packets_per_sec, s.echo.bytes_per_sec),
        (100, 1_000_000)
    );
    let s = load(
        "listen = [\"udp://127.0.0.1:0\"]\n[echo]\nudp = [\"0.0.0.0:5055-5058\", \"[::]:7\"]\n\
         tcp = [\"127.0.0.1:0\", \"127.0.0.1:0\"]\nwebsocket = true\nlong_poll_max_secs = 120\n\
         packets_per_sec = 10\nbytes_per_sec = 5000\n",
    )
    .expect("echo");
    let a = |s: &str| s.parse::<SocketAddr>().expect("addr");
    assert_eq!(
        s.echo.udp,
        vec![
            a("0.0.0.0:5055"),
            a("0.0.0.0:5056"),
            a("0.0.0.0:5057"),
            a("0.0.0.0:5058"),
            a("[::]:7")
        ]
    );
    assert_eq!(s.echo.tcp, vec![a("127.0.0.1:0"), a("127.0.0.1:0")]);
    assert!(s.echo.websocket && s.echo.http());
    assert_eq!(s.echo.long_poll_max_secs, 120);
    assert_eq!((s.echo.packets_per_sec, s.echo.bytes_per_sec), (10, 5000));

    let f = FileConfig::from_toml(
        "t",
        "listen = [\"udp://127.0.0.1:0\"]\n[echo]\nudp = [\"127.0.0.1:5055\"]\n",
    )
    .expect("parse");
    let cli = Cli::parse_from([
        "turnpike",
        "--echo-udp",
        "127.0.0.1:6000-6001",
        "--echo-tcp",
        "[::1]:0",
        "--echo-websocket",
        "--echo-long-poll-max",
        "30",
    ]);
    let s = Settings::resolve(f, &cli, "t".into()).expect("flags");
    assert_eq!(
        s.echo.udp,
        vec![
            a("127.0.0.1:5055"),
            a("127.0.0.1:6000"),
            a("127.0.0.1:6001")
        ]
    );
    assert_eq!(s.echo.tcp, vec![a("[::1]:0")]);
    assert!(s.echo.websocket);
    assert_eq!(s.echo.long_poll_max_secs, 30);
}

#[test]
fn bad_echo_values_name_the_key() {
    let base = "listen = [\"udp://127.0.0.1:0\"]\n[echo]\n";
    for (body, key, reason) in [
        ("udp = [\"127.0.0.1\"]", "echo.udp", "no port"),
        ("udp = [\"127.0.0.1:70000\"]", "echo.udp", "not a port"),
        ("udp = [\"localhost:7\"]", "echo.udp", "not an IP address"),
        ("udp = [\"::1:7\"]", "echo.udp", "brackets"),
        ("tcp = [\"127.0.0.1:5058-5055\"]", "echo.tcp", "MIN <= MAX"),
        ("tcp = [\"127.0.0.1:0-3\"]", "echo.tcp", "MIN <= MAX"),
        (
            "tcp = [\"127.0.0.1:1-65535\"]",
            "echo.tcp",
            "more than 1024 ports",
        ),
        (
            "udp = [\"127.0.0.1:5055-5058\", \"127.0.0.1:5058\"]",
            "echo.udp",
            "listed twice",
        ),
        ("packets_per_sec = 0", "echo.packets_per_sec", "above 0"),
        ("bytes_per_sec = 0", "echo.bytes_per_sec", "above 0"),
        (
            "long_poll_max_secs = 86400",
            "echo.long_poll_max_secs",
            "at most 3600",
        ),
        ("udp_ports = []", "echo", "unknown field `udp_ports`"),
        ("websocket = \"yes\"", "echo.websocket", "invalid type"),
    ] {
        let e = load(&format!("{base}{body}\n"))
            .expect_err(body)
            .to_string();
        assert!(
            e.contains("test.toml") && e.contains(key) && e.contains(reason),
            "{body}: {e}"
        );
    }
    let e = Settings::resolve(
        FileConfig::from_toml("t", "").expect("parse"),
        &Cli::parse_from([
            "turnpike",
            "--listen",
            "udp://127.0.0.1:0",
            "--echo-tcp",
            "127.0.0.1:x",
        ]),
        "t".into(),
    )
    .expect_err("bad flag")
    .to_string();
    assert!(
        e.contains("command line") && e.contains("--echo-tcp"),
        "{e}"
    );
}

#[test]
fn flags_override_and_extend_the_file() {
    let f = FileConfig::from_toml(
        "t",
        "listen = [\"udp://0.0.0.0:3478\"]\n[auth]\nsecrets = [\"a\"]\n",
    )
    .expect("parse");
    let cli = Cli::parse_from([
        "turnpike",
        "--listen",
        "udp://127.0.0.1:0",
        "--auth-secret",
        "b",
        "--allow-peer",
        "127.0.0.0/8",
        "--user",
        "alice:pw",
        "--user-quota",
        "3",
    ]);
    let s = Settings::resolve(f, &cli, "t".into()).expect("resolve");
    assert_eq!(
        s.listen.iter().map(|l| l.addr).collect::<Vec<_>>(),
        vec!["127.0.0.1:0".parse::<SocketAddr>().expect("a")]
    );
    assert_eq!(s.secrets, vec![Secret("a".into()), Secret("b".into())]);
    assert_eq!(s.users, vec![("alice".to_owned(), Secret("pw".into()))]);
    assert_eq!(s.quotas.user_allocations, Some(3));
    assert!(!s.generated_secret);
    let e = Settings::resolve(
        FileConfig::from_toml("t", "").expect("parse"),
        &Cli::parse_from(["turnpike", "--listen", "udp://nowhere"]),
        "t".into(),
    )
    .expect_err("bad flag")
    .to_string();
    assert!(e.contains("--listen"), "{e}");
}

#[test]
fn shared_relay_ports_cap_allocations_unless_the_quota_says_otherwise() {
    let base = "listen = [\"udp://127.0.0.1:0\"]\n";
    let quotas = |text: &str| {
        let q = load(text).expect("loads").quotas;
        (q.total_allocations, q.user_allocations)
    };
    assert_eq!(quotas(base), (None, None), "a port per allocation");
    let shared = format!("{base}shared_relay_ports = 2\n");
    assert_eq!(quotas(&shared), (Some(100_000), Some(1_000)));
    assert_eq!(
        quotas(&format!(
            "{shared}[quota]\ntotal_allocations = 0\nuser_allocations = 20\n"
        )),
        (None, Some(20)),
        "0 lifts the cap"
    );
    let cli = Cli::parse_from(["turnpike", "--total-quota", "0", "--user-quota", "5"]);
    let s = Settings::resolve(
        FileConfig::from_toml("t", &shared).expect("parse"),
        &cli,
        "t".into(),
    )
    .expect("resolve");
    assert_eq!(
        (s.quotas.total_allocations, s.quotas.user_allocations),
        (None, Some(5))
    );
    let e = load(&format!("{base}[allocation]\nmax_peer_endpoints = 0\n"))
        .expect_err("0 endpoints")
        .to_string();
    assert!(e.contains("allocation.max_peer_endpoints"), "{e}");
}

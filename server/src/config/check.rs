//! What `--check-config` prints: the effective configuration (file and flags together, every
//! default filled in) as TOML under the file's own key names, secrets hidden, so an operator
//! reads what the relay will run with and can paste it back into a file.

use std::net::SocketAddr;

use toml::{Table, Value};

use super::fleet::{AdminListen, FleetSettings};
use super::{Listener, LogFormat, Settings, TenantSettings};
use turnpike_proto::core::Alternate;
use turnpike_proto::tenant::DEFAULT_TENANT;

/// What stands for a secret or password in the output.
pub const HIDDEN: &str = "<hidden>";

/// The effective configuration as a TOML document.
pub fn effective_toml(s: &Settings) -> String {
    let mut root = Table::new();
    root.insert("realm".into(), s.realm.clone().into());
    root.insert("listen".into(), list(s.listen.iter().map(listen_url)));
    root.insert(
        "relay_ips".into(),
        list(s.relay_ips.iter().map(ToString::to_string)),
    );
    root.insert(
        "external_ips".into(),
        list(
            s.external_ips
                .iter()
                .map(|(public, private)| match private {
                    Some(p) => format!("{public}/{p}"),
                    None => public.to_string(),
                }),
        ),
    );
    root.insert(
        "relay_ports".into(),
        format!("{}-{}", s.relay_ports.0, s.relay_ports.1).into(),
    );
    root.insert(
        "shared_relay_ports".into(),
        int(u64::from(s.shared_relay_ports)),
    );
    root.insert("threads".into(), int(s.threads as u64));
    root.insert(
        "software".into(),
        s.software.clone().unwrap_or_default().into(),
    );
    root.insert(
        "software_unauthenticated".into(),
        s.software_unauthenticated.into(),
    );
    root.insert(
        "log_format".into(),
        match s.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
        .into(),
    );
    root.insert(
        "metrics_listen".into(),
        s.metrics_listen
            .map(|a| a.to_string())
            .unwrap_or_default()
            .into(),
    );
    root.insert("drain_grace_secs".into(), int(s.drain_grace_secs));
    root.insert(
        "socket_buffer_bytes".into(),
        int(s.socket_buffer_bytes as u64),
    );

    let default = s.tenants.iter().find(|t| t.name == DEFAULT_TENANT);
    let mut auth = Table::new();
    if let Some(t) = default {
        auth.insert("users".into(), users(t));
        let secrets = if s.generated_secret {
            list(["<generated at start>".to_owned()])
        } else {
            list(t.secrets.iter().map(|_| HIDDEN.to_owned()))
        };
        auth.insert("secrets".into(), secrets);
        auth.insert("api_keys".into(), api_keys(t));
        auth.insert("revoked".into(), list(t.revoked.iter().cloned()));
        auth.insert("credential_ttl_secs".into(), int(t.credential_ttl));
        auth.insert("credential_max_ttl_secs".into(), int(t.credential_max_ttl));
        auth.insert("ice_urls".into(), list(t.ice_urls.iter().cloned()));
    }
    auth.insert("nonce_lifetime_secs".into(), int(s.nonce_lifetime_secs));
    auth.insert(
        "unauthenticated_replies_per_sec".into(),
        Value::Float(s.unauthenticated_replies_per_sec),
    );
    if let Some(p) = &s.revoked_file {
        auth.insert("revoked_file".into(), p.display().to_string().into());
    }
    if s.nonce_secret.is_some() {
        auth.insert("nonce_secret".into(), HIDDEN.into());
    }
    root.insert("auth".into(), auth.into());

    root.insert(
        "allocation".into(),
        table([
            ("default_lifetime_secs", int(u64::from(s.default_lifetime))),
            ("max_lifetime_secs", int(u64::from(s.max_lifetime))),
            ("max_permissions", int(s.max_permissions as u64)),
            ("max_peer_endpoints", int(s.max_peer_endpoints as u64)),
            ("max_tcp_connections", int(s.max_tcp_connections as u64)),
        ]),
    );
    root.insert(
        "peer".into(),
        table([
            ("allow", list(s.allow_peer.iter().map(ToString::to_string))),
            ("deny", list(s.deny_peer.iter().map(ToString::to_string))),
        ]),
    );
    let q = &s.quotas;
    root.insert(
        "quota".into(),
        table([
            ("total_allocations", opt(q.total_allocations.map(u64::from))),
            ("user_allocations", opt(q.user_allocations.map(u64::from))),
            ("allocation_bytes_per_sec", opt(q.allocation_bandwidth)),
            ("user_bytes_per_sec", opt(q.user_bandwidth)),
        ]),
    );
    let mut tls = Table::new();
    if let Some(c) = &s.tls_cert {
        tls.insert("cert".into(), c.display().to_string().into());
    }
    if let Some(k) = &s.tls_key {
        tls.insert("key".into(), k.display().to_string().into());
    }
    root.insert("tls".into(), tls.into());
    root.insert(
        "https".into(),
        table([
            (
                "upstream",
                s.https_upstream
                    .map(|a| a.to_string())
                    .unwrap_or_default()
                    .into(),
            ),
            ("web_hostnames", list(s.web_hostnames.iter().cloned())),
            ("metrics", s.https_metrics.into()),
        ]),
    );
    root.insert(
        "tcp".into(),
        table([
            (
                "max_connections_per_ip",
                int(u64::from(s.max_connections_per_ip)),
            ),
            (
                "max_unallocated_connections",
                int(s.max_unallocated_connections as u64),
            ),
            ("handshake_timeout_secs", int(s.tcp_handshake_timeout_secs)),
            ("idle_timeout_secs", int(s.tcp_idle_timeout_secs)),
            (
                "unallocated_lifetime_secs",
                int(s.tcp_unallocated_lifetime_secs),
            ),
        ]),
    );
    let e = &s.echo;
    root.insert(
        "echo".into(),
        table([
            ("udp", list(e.udp.iter().map(addr))),
            ("tcp", list(e.tcp.iter().map(addr))),
            ("websocket", e.websocket.into()),
            ("long_poll_max_secs", int(e.long_poll_max_secs)),
            ("packets_per_sec", int(u64::from(e.packets_per_sec))),
            ("bytes_per_sec", int(e.bytes_per_sec)),
        ]),
    );
    fleet(&mut root, &s.fleet);
    let tenants: Vec<Value> = s
        .tenants
        .iter()
        .filter(|t| t.name != DEFAULT_TENANT && !t.relay_only)
        .map(tenant)
        .collect();
    if !tenants.is_empty() {
        root.insert("tenant".into(), Value::Array(tenants));
    }
    if let Some(p) = &s.test_page {
        root.insert(
            "test_page".into(),
            table([
                ("enabled", true.into()),
                ("ttl_secs", int(p.ttl_secs)),
                ("min_mbps", Value::Float(p.min_mbps)),
                ("ice_urls", list(p.ice_urls.iter().cloned())),
            ]),
        );
    }
    toml::to_string(&root).unwrap_or_else(|e| format!("# cannot print the configuration: {e}\n"))
}

/// `[store]`, `[admin]`, `[sessions]` and `[redirect]`.
fn fleet(root: &mut Table, f: &FleetSettings) {
    let mut store = Table::new();
    if let Some(url) = &f.store_url {
        store.insert("url".into(), crate::store::redact(&url.0).into());
    }
    store.insert("relay_name".into(), f.relay_name.clone().into());
    if let Some(d) = &f.state_dir {
        store.insert("state_dir".into(), d.display().to_string().into());
    }
    root.insert("store".into(), store.into());
    // The keys' names; their hashes are as good as the keys to an offline guesser.
    let keys = f
        .admin_keys
        .iter()
        .map(|(name, _)| table([("name", name.clone().into()), ("hash", HIDDEN.into())]));
    let mut admin = Table::new();
    admin.insert("keys".into(), Value::Array(keys.collect()));
    admin.insert(
        "listen".into(),
        match f.admin_listen {
            AdminListen::Metrics => "metrics".to_owned(),
            AdminListen::Own(a) => a.to_string(),
        }
        .into(),
    );
    admin.insert("https_listeners".into(), f.admin_https_listeners.into());
    if let Some(a) = &f.admin_advertise {
        admin.insert("advertise".into(), a.clone().into());
    }
    root.insert("admin".into(), admin.into());
    root.insert("sessions".into(), table([("log", f.session_log.into())]));
    let mut redirect = Table::new();
    redirect.insert("max_allocations".into(), int(f.max_allocations));
    redirect.insert(
        "siblings".into(),
        Value::Array(f.siblings.iter().map(alternate).collect()),
    );
    if let Some(a) = &f.advertise {
        redirect.insert("advertise".into(), alternate(a));
    }
    root.insert("redirect".into(), redirect.into());
}

fn alternate(a: &Alternate) -> Value {
    let mut t = Table::new();
    t.insert("udp".into(), list(a.udp.iter().map(addr)));
    t.insert("tcp".into(), list(a.tcp.iter().map(addr)));
    t.insert("tls".into(), list(a.tls.iter().map(addr)));
    if let Some(d) = &a.domain {
        t.insert("domain".into(), d.clone().into());
    }
    t.into()
}

fn tenant(t: &TenantSettings) -> Value {
    let q = &t.quotas;
    let mut out = Table::new();
    out.insert("name".into(), t.name.clone().into());
    out.insert("realm".into(), t.realm.clone().into());
    out.insert("hostnames".into(), list(t.hostnames.iter().cloned()));
    out.insert("origins".into(), list(t.origins.iter().cloned()));
    out.insert("users".into(), users(t));
    out.insert(
        "secrets".into(),
        list(t.secrets.iter().map(|_| HIDDEN.to_owned())),
    );
    out.insert("api_keys".into(), api_keys(t));
    out.insert("revoked".into(), list(t.revoked.iter().cloned()));
    out.insert("credential_ttl_secs".into(), int(t.credential_ttl));
    out.insert("credential_max_ttl_secs".into(), int(t.credential_max_ttl));
    out.insert("ice_urls".into(), list(t.ice_urls.iter().cloned()));
    out.insert(
        "quota".into(),
        table([
            ("allocations", opt(q.total_allocations.map(u64::from))),
            ("bytes_per_sec", opt(q.tenant_bandwidth)),
            ("user_allocations", opt(q.user_allocations.map(u64::from))),
            ("allocation_bytes_per_sec", opt(q.allocation_bandwidth)),
            ("user_bytes_per_sec", opt(q.user_bandwidth)),
        ]),
    );
    out.insert(
        "peer".into(),
        table([
            ("allow", list(t.allow_peer.iter().map(ToString::to_string))),
            ("deny", list(t.deny_peer.iter().map(ToString::to_string))),
        ]),
    );
    out.into()
}

fn users(t: &TenantSettings) -> Value {
    Value::Array(
        t.users
            .iter()
            .map(|(name, _)| table([("name", name.clone().into()), ("password", HIDDEN.into())]))
            .collect(),
    )
}

fn api_keys(t: &TenantSettings) -> Value {
    list(t.api_keys.iter().map(|k| {
        let hex: String = k.0.iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }))
}

fn listen_url(l: &Listener) -> String {
    let proxy = if l.proxy_protocol {
        "?proxy-protocol"
    } else {
        ""
    };
    format!("{}://{}{proxy}", l.transport.scheme(), l.addr)
}

fn addr(a: &SocketAddr) -> String {
    a.to_string()
}

fn list(items: impl IntoIterator<Item = String>) -> Value {
    Value::Array(items.into_iter().map(Value::String).collect())
}

fn int(v: u64) -> Value {
    Value::Integer(i64::try_from(v).unwrap_or(i64::MAX))
}

/// An optional limit: the file writes "unlimited" as 0.
fn opt(v: Option<u64>) -> Value {
    int(v.unwrap_or(0))
}

fn table<const N: usize>(entries: [(&str, Value); N]) -> Value {
    Value::Table(
        entries
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, FileConfig};

    fn settings(text: &str) -> Settings {
        let f = FileConfig::from_toml("test.toml", text).expect("parses");
        Settings::resolve(f, &Cli::default(), "test.toml".into()).expect("resolves")
    }

    #[test]
    fn the_effective_configuration_reads_back_as_the_same_settings_without_secrets() {
        let text = r#"
realm = "example.org"
listen = ["udp://127.0.0.1:3478", "tcp://127.0.0.1:3478?proxy-protocol"]
relay_ports = "50000-50100"
[auth]
secrets = ["a-long-fleet-secret-value-0123456789"]
users = [{ name = "alice", password = "alice-password-value" }]
[peer]
allow = ["10.20.0.0/16"]
[quota]
user_allocations = 5
[store]
url = "postgres://turnpike:store-password-value@db/fleet?sslmode=require"
state_dir = "/srv/turnpike-state"
[admin]
keys = [{ name = "ops", hash = "sha256:6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b" }]
listen = "127.0.0.1:9642"
advertise = "http://10.0.0.5:9642"
[redirect]
max_allocations = 5000
siblings = [{ udp = ["203.0.113.7:3478"], tls = ["203.0.113.7:443"], domain = "relay-2.example.org" }]
[[tenant]]
name = "acme"
realm = "acme.example"
secrets = ["another-long-secret-value-abcdefgh"]
[tenant.quota]
allocations = 100
"#;
        let s = settings(text);
        let out = effective_toml(&s);
        for secret in [
            "a-long-fleet-secret-value-0123456789",
            "alice-password-value",
            "another-long-secret-value-abcdefgh",
            "store-password-value",
        ] {
            assert!(!out.contains(secret), "{secret} printed:\n{out}");
        }
        // Hidden secrets aside, it is a configuration the relay reads as the same settings.
        let mut n = 0;
        let key_hash = "sha256:6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b";
        assert!(
            !out.contains(&key_hash[7..]),
            "an admin key's hash printed:\n{out}"
        );
        let filled = out
            .replace(
                &format!("hash = \"{HIDDEN}\""),
                &format!("hash = \"{key_hash}\""),
            )
            .split(HIDDEN)
            .map(str::to_owned)
            .reduce(|a, b| {
                n += 1;
                format!("{a}replaced-in-the-test-{n:04}{b}")
            })
            .unwrap_or_default();
        let back = settings(&filled);
        assert_eq!(back.listen, s.listen);
        assert_eq!(back.relay_ports, s.relay_ports);
        assert_eq!(back.allow_peer, s.allow_peer);
        assert_eq!(back.quotas, s.quotas);
        assert_eq!(back.tenants.len(), s.tenants.len());
        assert_eq!(back.tenants[1].quotas, s.tenants[1].quotas);
        assert_eq!(back.max_tcp_connections, s.max_tcp_connections);
        // The fleet's settings too, the store's password aside.
        let (mut fleet, mut shown) = (back.fleet, s.fleet);
        assert_eq!(
            fleet.store_url.take().map(|u| u.0),
            Some("postgres://turnpike@db/fleet?sslmode=require".to_owned()),
            "{out}"
        );
        shown.store_url = None;
        assert_eq!(fleet, shown, "{out}");
        assert!(out.contains("state_dir = \"/srv/turnpike-state\""), "{out}");
        assert!(
            out.contains("[tcp]") && out.contains("handshake_timeout_secs = 10"),
            "{out}"
        );
    }
}

//! The file and the flags resolved into [`Settings`]: every value parsed and checked, each
//! error naming the file (or "command line"), the key (or flag) and the reason.

use ipnet::IpNet;

use super::file::{EchoConfig, FileConfig};
use super::parse::{
    parse_all, parse_echo_spec, parse_external, parse_listen, parse_log_format, parse_net,
    parse_ports,
};
use super::tenant::read_revocations;
use super::{
    tenant, Cli, EchoSettings, Secret, Settings, TenantSettings, Transport, MAX_ECHO_PORTS,
    MAX_LONG_POLL_SECS,
};
use crate::Error;

impl Settings {
    pub(crate) fn resolve(f: FileConfig, cli: &Cli, source: String) -> Result<Self, Error> {
        let file_err = |key: &str, reason: String| Error::Config {
            file: source.clone(),
            key: key.to_owned(),
            reason,
        };
        let flag_err = |flag: &str, reason: String| Error::Config {
            file: "command line".to_owned(),
            key: flag.to_owned(),
            reason,
        };
        let listen = if cli.listen.is_empty() {
            parse_all(&f.listen, parse_listen).map_err(|e| file_err("listen", e))?
        } else {
            parse_all(&cli.listen, parse_listen).map_err(|e| flag_err("--listen", e))?
        };
        if listen.is_empty() {
            return Err(file_err("listen", "no listener configured".into()));
        }
        let relay_ips = if cli.relay_ips.is_empty() {
            f.relay_ips
        } else {
            cli.relay_ips.clone()
        };
        let tls_cert = cli.cert.clone().or(f.tls.cert);
        let tls_key = cli.key.clone().or(f.tls.key);
        if listen.iter().any(|l| l.transport == Transport::Tls)
            && (tls_cert.is_none() || tls_key.is_none())
        {
            let reason = "tls:// listeners need tls.cert and tls.key (--cert, --key)".to_owned();
            return Err(if cli.listen.is_empty() {
                file_err("tls", reason)
            } else {
                flag_err("--listen", reason)
            });
        }
        let https_upstream = match (&cli.https_upstream, &f.https.upstream) {
            (Some(u), _) => Some(
                u.parse()
                    .map_err(|e| flag_err("--https-upstream", format!("{e}: {u:?}")))?,
            ),
            (None, Some(u)) if !u.is_empty() => Some(
                u.parse()
                    .map_err(|e| file_err("https.upstream", format!("{e}: {u:?}")))?,
            ),
            _ => None,
        };
        for (key, zero) in [
            (
                "tcp.max_connections_per_ip",
                f.tcp.max_connections_per_ip == 0,
            ),
            ("tcp.idle_timeout_secs", f.tcp.idle_timeout_secs == 0),
            (
                "tcp.handshake_timeout_secs",
                f.tcp.handshake_timeout_secs == 0,
            ),
            (
                "tcp.max_unallocated_connections",
                f.tcp.max_unallocated_connections == 0,
            ),
            (
                "allocation.max_tcp_connections",
                f.allocation.max_tcp_connections == 0,
            ),
        ] {
            if zero {
                return Err(file_err(key, "must be above 0".into()));
            }
        }
        if f.tcp.unallocated_lifetime_secs < f.tcp.handshake_timeout_secs {
            return Err(file_err(
                "tcp.unallocated_lifetime_secs",
                format!(
                    "{}: at least tcp.handshake_timeout_secs ({}), the time a client has to make its allocation",
                    f.tcp.unallocated_lifetime_secs, f.tcp.handshake_timeout_secs
                ),
            ));
        }
        let external_ips = if cli.external_ips.is_empty() {
            parse_all(&f.external_ips, parse_external).map_err(|e| file_err("external_ips", e))?
        } else {
            parse_all(&cli.external_ips, parse_external)
                .map_err(|e| flag_err("--external-ip", e))?
        };
        let relay_ports = match &cli.relay_ports {
            Some(r) => parse_ports(r).map_err(|e| flag_err("--relay-ports", e))?,
            None => parse_ports(&f.relay_ports).map_err(|e| file_err("relay_ports", e))?,
        };
        let shared_relay_ports = cli.shared_relay_ports.unwrap_or(f.shared_relay_ports);
        let span =
            u32::from(relay_ports.1.max(relay_ports.0) - relay_ports.1.min(relay_ports.0)) + 1;
        if shared_relay_ports > MAX_SHARED_RELAY_PORTS || u32::from(shared_relay_ports) > span {
            let reason = format!(
                "{shared_relay_ports}: at most {MAX_SHARED_RELAY_PORTS} per thread, within \
                 the relay_ports range ({span} ports)"
            );
            return Err(match cli.shared_relay_ports {
                Some(_) => flag_err("--shared-relay-ports", reason),
                None => file_err("shared_relay_ports", reason),
            });
        }
        let log_format = match cli.log_format.as_deref() {
            Some(l) => parse_log_format(l).map_err(|e| flag_err("--log-format", e))?,
            None => parse_log_format(&f.log_format).map_err(|e| file_err("log_format", e))?,
        };
        let metrics_listen = match &cli.metrics_listen {
            Some(m) => Some(
                m.parse()
                    .map_err(|e| flag_err("--metrics-listen", format!("{e}: {m:?}")))?,
            ),
            None => match &f.metrics_listen {
                Some(m) if !m.is_empty() => Some(
                    m.parse()
                        .map_err(|e| file_err("metrics_listen", format!("{e}: {m:?}")))?,
                ),
                _ => None,
            },
        };
        let mut users = tenant::users(&f.auth.users, "auth.users", &file_err)?;
        for u in &cli.users {
            let Some((n, p)) = u.split_once(':') else {
                return Err(flag_err("--user", "expected NAME:PASSWORD".into()));
            };
            users.push((n.to_owned(), Secret(p.to_owned())));
        }
        let mut secrets = tenant::secrets(&f.auth.secrets, "auth.secrets", &file_err)?;
        secrets.extend(
            cli.auth_secrets
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .map(Secret),
        );
        let generated_secret = users.is_empty() && secrets.is_empty() && f.tenant.is_empty();
        if generated_secret {
            let mut s = [0u8; 24];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut s);
            secrets.push(Secret(s.iter().map(|b| format!("{b:02x}")).collect()));
        }
        let mut allow_peer =
            parse_all(&f.peer.allow, parse_net).map_err(|e| file_err("peer.allow", e))?;
        allow_peer.extend(
            parse_all(&cli.allow_peer, parse_net).map_err(|e| flag_err("--allow-peer", e))?,
        );
        let mut deny_peer =
            parse_all(&f.peer.deny, parse_net).map_err(|e| file_err("peer.deny", e))?;
        deny_peer
            .extend(parse_all(&cli.deny_peer, parse_net).map_err(|e| flag_err("--deny-peer", e))?);
        let nonzero32 = |v: u32| (v != 0).then_some(v);
        let nonzero64 = |v: u64| (v != 0).then_some(v);
        // Set (0: unlimited), or by default unlimited with dedicated ports, which the port
        // range bounds, and capped with shared ones.
        let cap = |set: Option<u32>, shared_default: u32| match set {
            Some(n) => nonzero32(n),
            None => (shared_relay_ports > 0).then_some(shared_default),
        };
        let quotas = turnpike_proto::quota::Quotas {
            total_allocations: cap(
                cli.total_quota.or(f.quota.total_allocations),
                super::file::SHARED_TOTAL_ALLOCATIONS,
            ),
            user_allocations: cap(
                cli.user_quota.or(f.quota.user_allocations),
                super::file::SHARED_USER_ALLOCATIONS,
            ),
            allocation_bandwidth: cli
                .max_bps
                .or(nonzero64(f.quota.allocation_bytes_per_sec))
                .and_then(nonzero64),
            user_bandwidth: nonzero64(f.quota.user_bytes_per_sec),
            tenant_bandwidth: None,
        };
        if generated_secret && !f.auth.api_keys.is_empty() {
            return Err(file_err(
                "auth.api_keys",
                "the credential service mints with auth.secrets: add one (a generated secret would change at every start, and other relays would not know it)".into(),
            ));
        }
        let realm = cli.realm.clone().unwrap_or(f.realm);
        let mut tenants = Vec::new();
        if !users.is_empty() || !secrets.is_empty() {
            let api_keys = tenant::api_keys(&f.auth.api_keys, "auth.api_keys", &file_err)?;
            let (credential_ttl, credential_max_ttl) = tenant::ttls(
                f.auth.credential_ttl_secs,
                f.auth.credential_max_ttl_secs,
                "auth.",
                &file_err,
            )?;
            tenants.push(TenantSettings {
                name: turnpike_proto::tenant::DEFAULT_TENANT.to_owned(),
                realm: realm.clone(),
                hostnames: Vec::new(),
                origins: Vec::new(),
                users: users.clone(),
                secrets: secrets.clone(),
                api_keys,
                revoked: f.auth.revoked.clone(),
                credential_ttl,
                credential_max_ttl,
                ice_urls: tenant::ice_urls(&f.auth.ice_urls, "auth.ice_urls", &file_err)?,
                quotas: turnpike_proto::quota::Quotas {
                    total_allocations: None,
                    ..quotas.clone()
                },
                allow_peer: Vec::new(),
                deny_peer: Vec::new(),
                relay_only: false,
                max_lifetime: None,
            });
        } else if !f.auth.api_keys.is_empty() || !f.auth.revoked.is_empty() {
            return Err(file_err(
                "auth",
                "api_keys and revoked apply to the top-level realm's users and secrets, and none are configured".into(),
            ));
        }
        tenants.extend(tenant::resolve(&f.tenant, &realm, &quotas, &file_err)?);
        // One secret in two tenants would let the first tenant's search claim the other's
        // credentials in the default realm.
        for (i, t) in tenants.iter().enumerate() {
            let shared = t
                .secrets
                .iter()
                .any(|s| tenants[..i].iter().any(|o| o.secrets.contains(s)));
            if shared {
                let key = match f.tenant.iter().position(|c| c.name == t.name) {
                    Some(n) => format!("tenant[{n}].secrets"),
                    None => "auth.secrets".to_owned(),
                };
                return Err(file_err(
                    &key,
                    "a secret of another tenant: each tenant needs its own".into(),
                ));
            }
        }
        let test_page = if f.test_page.enabled {
            let (page, t) = tenant::test_page(&f.test_page, &realm, &file_err)?;
            tenants.push(t);
            Some(page)
        } else {
            None
        };
        let mut warnings = Vec::new();
        host_bits(&mut warnings, "peer.allow", &allow_peer);
        host_bits(&mut warnings, "peer.deny", &deny_peer);
        for t in &tenants {
            let at = match f.tenant.iter().position(|c| c.name == t.name) {
                Some(n) => format!("tenant[{n}]."),
                None if t.relay_only => continue,
                None => "auth.".to_owned(),
            };
            host_bits(&mut warnings, &format!("{at}peer.allow"), &t.allow_peer);
            host_bits(&mut warnings, &format!("{at}peer.deny"), &t.deny_peer);
            short_secrets(&mut warnings, &format!("{at}secrets"), &t.secrets);
        }
        let tls = listen.iter().any(|l| l.transport == Transport::Tls);
        if !tls && tenants.iter().any(|t| !t.api_keys.is_empty()) {
            warnings.push(
                "api_keys are set but no tls:// listener serves the credential service (HTTPS only)"
                    .to_owned(),
            );
        }
        if let Some(page) = &test_page {
            if !tls {
                warnings.push(
                    "test_page is enabled but no tls:// listener serves it (the page is served over HTTPS only)"
                        .to_owned(),
                );
            }
            let cap = f.test_page.bytes_per_sec as f64 * 8.0 / 1e6;
            if f.test_page.bytes_per_sec != 0 && page.min_mbps > cap {
                warnings.push(format!(
                    "test_page.min_mbps {} is above the {cap} Mbit/s that test_page.bytes_per_sec lets the page measure: every path will get a warning",
                    page.min_mbps
                ));
            }
        }
        if let Some(path) = &f.auth.revoked_file {
            let (entries, bad) = read_revocations(path, &tenants);
            warnings.extend(bad);
            for (tenant, user) in entries {
                for t in tenants
                    .iter_mut()
                    .filter(|x| tenant.as_ref().is_none_or(|n| *n == x.name))
                {
                    t.revoked.push(user.clone());
                }
            }
        }
        let max_lifetime = cli.max_lifetime.unwrap_or(f.allocation.max_lifetime_secs);
        if f.allocation.default_lifetime_secs == 0 {
            return Err(file_err(
                "allocation.default_lifetime_secs",
                "must be above 0".into(),
            ));
        }
        if max_lifetime < f.allocation.default_lifetime_secs {
            return Err(file_err(
                "allocation.max_lifetime_secs",
                format!(
                    "{max_lifetime} is below default_lifetime_secs {}",
                    f.allocation.default_lifetime_secs
                ),
            ));
        }
        let replies = f.auth.unauthenticated_replies_per_sec;
        if !(replies.is_finite() && replies >= 1.0) {
            return Err(file_err(
                "auth.unauthenticated_replies_per_sec",
                format!("{replies}: at least 1 (clients need their 401 to authenticate)"),
            ));
        }
        if f.auth.nonce_lifetime_secs < 30 {
            return Err(file_err(
                "auth.nonce_lifetime_secs",
                "below 30 s, clients would loop on 438 Stale Nonce".into(),
            ));
        }
        if f.allocation.max_permissions == 0 {
            return Err(file_err(
                "allocation.max_permissions",
                "must be above 0".into(),
            ));
        }
        if f.allocation.max_peer_endpoints == 0 {
            return Err(file_err(
                "allocation.max_peer_endpoints",
                "must be above 0".into(),
            ));
        }
        let echo = resolve_echo(&f.echo, cli, &file_err, &flag_err)?;
        let fleet = super::fleet::resolve(
            &f.store,
            &f.admin,
            &f.sessions,
            &f.redirect,
            cli.store.as_deref(),
            &file_err,
        )?;
        Ok(Settings {
            fleet,
            realm,
            listen,
            tls_cert,
            tls_key,
            https_upstream,
            web_hostnames: f.https.web_hostnames,
            https_metrics: f.https.metrics,
            max_connections_per_ip: f.tcp.max_connections_per_ip,
            tcp_idle_timeout_secs: f.tcp.idle_timeout_secs,
            tcp_handshake_timeout_secs: f.tcp.handshake_timeout_secs,
            max_unallocated_connections: f.tcp.max_unallocated_connections,
            tcp_unallocated_lifetime_secs: f.tcp.unallocated_lifetime_secs,
            echo,
            relay_ips,
            external_ips,
            relay_ports,
            shared_relay_ports,
            threads: cli.threads.unwrap_or(f.threads),
            software: (!f.software.is_empty()).then_some(f.software),
            software_unauthenticated: f.software_unauthenticated,
            unauthenticated_replies_per_sec: f.auth.unauthenticated_replies_per_sec,
            log_format,
            metrics_listen,
            drain_grace_secs: cli.drain_grace.unwrap_or(f.drain_grace_secs),
            socket_buffer_bytes: f.socket_buffer_bytes,
            users,
            secrets,
            nonce_lifetime_secs: f.auth.nonce_lifetime_secs,
            nonce_secret: cli
                .nonce_secret
                .clone()
                .map(Secret)
                .or(f.auth.nonce_secret)
                .filter(|s| !s.0.is_empty()),
            default_lifetime: f.allocation.default_lifetime_secs,
            max_lifetime,
            max_permissions: f.allocation.max_permissions,
            max_tcp_connections: f.allocation.max_tcp_connections,
            max_peer_endpoints: f.allocation.max_peer_endpoints,
            allow_peer,
            deny_peer,
            quotas,
            generated_secret,
            tenants,
            revoked_file: f.auth.revoked_file,
            test_page,
            warnings,
            listen_origin: if cli.listen.is_empty() {
                (source.clone(), "listen")
            } else {
                ("command line".to_owned(), "--listen")
            },
            metrics_origin: if cli.metrics_listen.is_some() {
                ("command line".to_owned(), "--metrics-listen")
            } else {
                (source.clone(), "metrics_listen")
            },
            source,
        })
    }
}

/// `[echo]` and the `--echo-*` flags (which add to the file's lists).
fn resolve_echo(
    f: &EchoConfig,
    cli: &Cli,
    file_err: &dyn Fn(&str, String) -> Error,
    flag_err: &dyn Fn(&str, String) -> Error,
) -> Result<EchoSettings, Error> {
    let mut udp = Vec::new();
    let mut tcp = Vec::new();
    for (list, from_file, from_flags, key, flag) in [
        (&mut udp, &f.udp, &cli.echo_udp, "echo.udp", "--echo-udp"),
        (&mut tcp, &f.tcp, &cli.echo_tcp, "echo.tcp", "--echo-tcp"),
    ] {
        for (specs, err, name) in [(from_file, file_err, key), (from_flags, flag_err, flag)] {
            for spec in specs {
                let addrs = parse_echo_spec(spec).map_err(|e| err(name, e))?;
                for a in addrs {
                    if a.port() != 0 && list.contains(&a) {
                        return Err(err(name, format!("{spec:?}: {a} is listed twice")));
                    }
                    list.push(a);
                }
                if list.len() > MAX_ECHO_PORTS {
                    return Err(err(
                        name,
                        format!("more than {MAX_ECHO_PORTS} ports in all: {spec:?}"),
                    ));
                }
            }
        }
    }
    if f.packets_per_sec == 0 {
        return Err(file_err("echo.packets_per_sec", "must be above 0".into()));
    }
    if f.bytes_per_sec == 0 {
        return Err(file_err("echo.bytes_per_sec", "must be above 0".into()));
    }
    let long_poll_max_secs = match cli.echo_long_poll_max {
        Some(s) if s > MAX_LONG_POLL_SECS => {
            return Err(flag_err(
                "--echo-long-poll-max",
                format!("{s}: at most {MAX_LONG_POLL_SECS}"),
            ))
        }
        Some(s) => s,
        None if f.long_poll_max_secs > MAX_LONG_POLL_SECS => {
            return Err(file_err(
                "echo.long_poll_max_secs",
                format!("{}: at most {MAX_LONG_POLL_SECS}", f.long_poll_max_secs),
            ))
        }
        None => f.long_poll_max_secs,
    };
    Ok(EchoSettings {
        udp,
        tcp,
        websocket: f.websocket || cli.echo_websocket,
        long_poll_max_secs,
        packets_per_sec: f.packets_per_sec,
        bytes_per_sec: f.bytes_per_sec,
    })
}

/// Most shared relay ports per thread and relay address.
const MAX_SHARED_RELAY_PORTS: u16 = 1024;

/// Shared secrets shorter than this are warned about: an HMAC key an attacker may guess.
const SHORT_SECRET: usize = 16;

/// Warns of networks written with host bits (`10.0.0.1/8`): the rule covers the whole
/// network, which may not be what was meant.
fn host_bits(warnings: &mut Vec<String>, key: &str, nets: &[IpNet]) {
    for n in nets {
        if n.trunc() != *n {
            warnings.push(format!(
                "{key}: {n} has host bits set; it means {} (write that, or /{} for one address)",
                n.trunc(),
                n.max_prefix_len()
            ));
        }
    }
}

fn short_secrets(warnings: &mut Vec<String>, key: &str, secrets: &[Secret]) {
    for (i, s) in secrets.iter().enumerate() {
        let n = s.0.chars().count();
        if n < SHORT_SECRET {
            warnings.push(format!(
                "{key}[{i}]: {n} characters; a shared secret should be at least {SHORT_SECRET} random characters (openssl rand -base64 32)"
            ));
        }
    }
}

//! Start-up and shutdown: settings to sockets, shards and the metrics endpoint; SIGTERM drains.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::RngCore;

use std::path::PathBuf;

use crate::config::{Cli, LogFormat, Settings};
use crate::echo::{self, Echo};
use crate::io::{self, ShardSetup};
use crate::metrics::{self, Metrics};
use crate::proto::auth::{ephemeral_password, ephemeral_username, Credentials};
use crate::proto::policy::PeerPolicy;
use crate::proto::quota::QuotaState;
use crate::proto::tenant::{Tenant, Tenants, DEFAULT_TENANT};
use crate::proto::{CoreConfig, Shared};
use crate::service::CredentialService;
use crate::testpage::TestPage;
use crate::Error;

pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TURNPIKE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// The core's settings: tenants (credentials, quotas, policy) and limits. Rebuilt on reload.
fn core_config(
    settings: &Settings,
    plan: &io::RelayPlan,
    bound: &[std::net::SocketAddr],
) -> CoreConfig {
    let own_ips: Vec<_> = [plan.v4, plan.v6]
        .into_iter()
        .flatten()
        .flat_map(|(bind, advertised)| [bind, advertised])
        .chain(
            settings
                .external_ips
                .iter()
                .flat_map(|(public, private)| [Some(*public), *private])
                .flatten(),
        )
        .collect();
    let tenants = settings
        .tenants
        .iter()
        .map(|t| {
            let mut policy = PeerPolicy::new(
                [&settings.allow_peer[..], &t.allow_peer[..]].concat(),
                [&settings.deny_peer[..], &t.deny_peer[..]].concat(),
            );
            if t.relay_only {
                policy = policy.relay_only();
            }
            policy.set_own_addresses(bound.to_vec(), own_ips.clone(), plan.ports);
            let credentials = Credentials::new(
                &t.realm,
                t.users.iter().map(|(u, p)| (u.as_str(), p.0.as_str())),
                t.secrets.iter().map(|s| s.0.clone()),
            );
            let mut tenant = Tenant::new(&t.name, credentials, policy);
            tenant.origins = t.origins.clone();
            tenant.hostnames = t.hostnames.clone();
            tenant.quotas = t.quotas.clone();
            tenant.revoked = t.revoked.iter().cloned().collect();
            tenant.max_lifetime = t.max_lifetime;
            tenant
        })
        .collect();
    CoreConfig {
        tenants: Tenants::new(&settings.realm, tenants),
        default_lifetime: settings.default_lifetime,
        max_lifetime: settings.max_lifetime,
        nonce_lifetime: settings.nonce_lifetime_secs,
        max_permissions: settings.max_permissions,
        max_tcp_connections: settings.max_tcp_connections,
        relay_v4: plan.v4.is_some(),
        relay_v6: plan.v6.is_some(),
        software: settings.software.clone(),
        software_unauthenticated: settings.software_unauthenticated,
        unauthenticated_replies_per_sec: settings.unauthenticated_replies_per_sec,
        relay_ports: plan.ports,
    }
}

/// Loads what `--check-config` must prove besides the file itself: the certificates.
pub fn check(settings: &Settings) -> Result<(), Error> {
    tls_of(settings).map(|_| ())
}

fn tls_of(settings: &Settings) -> Result<Option<Arc<rustls::ServerConfig>>, Error> {
    match (&settings.tls_cert, &settings.tls_key) {
        (Some(c), Some(k)) => Ok(Some(io::stream::tls_config(c, k)?)),
        _ => Ok(None),
    }
}

/// Files whose change triggers a reload: the config file, the certificate and the key.
fn watched(cli: &Cli, settings: &Settings) -> Vec<(PathBuf, Option<SystemTime>)> {
    [
        cli.config.clone(),
        settings.tls_cert.clone(),
        settings.tls_key.clone(),
        settings.revoked_file.clone(),
    ]
    .into_iter()
    .flatten()
    .map(|p| {
        let t = std::fs::metadata(&p).and_then(|m| m.modified()).ok();
        (p, t)
    })
    .collect()
}

/// Everything a reload touches.
struct Reloader<'a> {
    cli: &'a Cli,
    current: Settings,
    plan: io::RelayPlan,
    bound: Vec<std::net::SocketAddr>,
    shared: Arc<Shared>,
    streams: Arc<io::stream::StreamContext>,
    credentials: Arc<CredentialService>,
    metrics: Arc<Metrics>,
    files: Vec<(PathBuf, Option<SystemTime>)>,
}

impl Reloader<'_> {
    fn changed(&self) -> bool {
        self.files
            .iter()
            .any(|(p, t)| std::fs::metadata(p).and_then(|m| m.modified()).ok() != *t)
    }

    /// Re-reads the configuration and certificates; on any error the running configuration
    /// stays. Existing allocations keep relaying either way.
    fn reload(&mut self, why: &str) {
        // The files' times before reading them: an edit made while this reload reads them
        // triggers the next one.
        let before = watched(self.cli, &self.current);
        self.files = before.clone();
        let mut next = match Settings::load(self.cli) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "reload refused; the running configuration stays");
                return;
            }
        };
        if next.generated_secret {
            // Keep the secret generated at start, so the printed credential stays valid.
            next.secrets = self.current.secrets.clone();
            if let Some(t) = next.tenants.iter_mut().find(|t| t.name == DEFAULT_TENANT) {
                t.secrets = next.secrets.clone();
            }
        }
        // The test page's secret is made at start: keep it, so issued credentials stay valid.
        for t in next.tenants.iter_mut().filter(|t| t.relay_only) {
            if let Some(old) = self.current.tenants.iter().find(|o| o.name == t.name) {
                t.secrets = old.secrets.clone();
            }
        }
        let tls = match tls_of(&next) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "reload refused; the running configuration stays");
                return;
            }
        };
        for w in &next.warnings {
            tracing::warn!("{w}");
        }
        if next.listen != self.current.listen
            || next.relay_ips != self.current.relay_ips
            || next.echo != self.current.echo
        {
            tracing::warn!("listeners, relay addresses and echo services change only on restart");
        }
        self.shared
            .reload(core_config(&next, &self.plan, &self.bound));
        self.metrics.add_tenants(&self.shared.tenant_names());
        self.credentials.reload(&next);
        if tls.is_some() {
            self.streams.tls.store(tls);
        }
        tracing::info!(
            trigger = why,
            tenants = next.tenants.len(),
            users = next.users.len(),
            secrets = next.secrets.len(),
            revoked = next.tenants.iter().map(|t| t.revoked.len()).sum::<usize>(),
            allow_peer = next.allow_peer.len(),
            deny_peer = next.deny_peer.len(),
            "configuration reloaded"
        );
        let paths =
            |f: &[(PathBuf, Option<SystemTime>)]| f.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
        let after = watched(self.cli, &next);
        self.files = if paths(&after) == paths(&before) {
            before
        } else {
            after
        };
        self.current = next;
    }
}

/// Runs the relay until SIGTERM or SIGINT, then drains. SIGHUP, or a change of the
/// configuration file or certificate, reloads credentials, peer policy and certificates.
pub fn run(cli: &Cli, settings: Settings) -> Result<(), Error> {
    raise_open_files_limit();
    let shards = match settings.threads {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n,
    };
    let plan = io::relay_plan(&settings);
    let tls = tls_of(&settings)?;
    let listeners = io::bind_listeners(&settings.listen, shards, settings.socket_buffer_bytes)?;
    let bound: Vec<_> = listeners.iter().filter_map(io::Bound::local_addr).collect();

    let config = core_config(&settings, &plan, &bound);
    let mut nonce_key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut nonce_key);
    let shared = Arc::new(Shared::new(
        config,
        QuotaState::new(settings.quotas.total_allocations),
        nonce_key,
        Instant::now(),
    ));
    reserve_own_ports(&shared, &plan, &listeners);
    let metrics = Arc::new(Metrics::new());
    metrics.set_capacity(settings.quotas.total_allocations, plan.ports);
    metrics.add_tenants(&shared.tenant_names());

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let metrics_listener = match settings.metrics_listen {
        Some(addr) => Some(rt.block_on(metrics::bind(addr))?),
        None => None,
    };
    let echo_sockets = echo::bind(&settings.echo)?;
    let echo = Arc::new(Echo::new(
        &settings.echo,
        settings.max_connections_per_ip,
        Arc::clone(&metrics),
    ));
    let echo_routes = echo::routes(&echo);

    tracing::info!(config = %settings.source, shards, realm = %settings.realm, "turnpike {} starting", env!("CARGO_PKG_VERSION"));
    for l in &listeners {
        let l = l.listener();
        let proxy = if l.proxy_protocol {
            " (PROXY protocol)"
        } else {
            ""
        };
        tracing::info!("listening on {}://{}{proxy}", l.transport.scheme(), l.addr);
        if settings.test_page.is_some() && l.transport == crate::config::Transport::Tls {
            tracing::info!("network test page on https://{}/test", l.addr);
        }
        if settings.tenants.iter().any(|t| !t.api_keys.is_empty())
            && l.transport == crate::config::Transport::Tls
        {
            tracing::info!("credential service on https://{}/v1/credentials", l.addr);
        }
    }
    for w in &settings.warnings {
        tracing::warn!("{w}");
    }
    for a in echo_sockets.udp_addrs() {
        tracing::info!("listening on echo-udp://{a}");
    }
    for a in echo_sockets.tcp_addrs() {
        tracing::info!("listening on echo-tcp://{a}");
    }
    if settings.echo.websocket {
        tracing::info!("WebSocket echo on /echo/ws");
    }
    if settings.echo.long_poll_max_secs > 0 {
        tracing::info!(
            max_secs = settings.echo.long_poll_max_secs,
            "long-poll echo on /echo/poll"
        );
    }
    if let Some((bind, public)) = plan.v4 {
        tracing::info!(%bind, advertised = %public, ports = ?plan.ports, "relaying IPv4");
    }
    if let Some((bind, public)) = plan.v6 {
        tracing::info!(%bind, advertised = %public, ports = ?plan.ports, "relaying IPv6");
    }
    if let Some(l) = &metrics_listener {
        if let Ok(a) = l.local_addr() {
            tracing::info!("metrics on http://{a}/metrics");
        }
    }
    let bound_listeners: Vec<_> = listeners
        .iter()
        .map(|b| {
            let mut l = b.listener();
            if let Some(a) = b.local_addr() {
                l.addr = a;
            }
            l
        })
        .collect();
    if settings.generated_secret {
        print_credential(&settings, &bound_listeners);
    }
    let credentials = Arc::new(CredentialService::new(&settings, &bound_listeners));
    let test_page = settings.test_page.clone().map(|t| {
        Arc::new(TestPage::new(
            t,
            Arc::clone(&credentials),
            plan.ports,
            settings.echo.websocket,
            settings.echo.long_poll_max_secs > 0,
        ))
        .routes()
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let reservations = io::new_reservations();
    let admission = io::admission::Admission::new(
        settings.max_connections_per_ip,
        settings.max_unallocated_connections,
    );
    let http_limits = io::stream::HttpLimits {
        headers: Duration::from_secs(settings.tcp_handshake_timeout_secs),
        long_poll_max: Duration::from_secs(settings.echo.long_poll_max_secs),
    };
    let streams = Arc::new(io::stream::StreamContext {
        tls: arc_swap::ArcSwapOption::new(tls),
        upstream: settings.https_upstream,
        web_hostnames: settings.web_hostnames.clone(),
        admission: Arc::clone(&admission),
        handshake_timeout: http_limits.headers,
        idle_timeout: Duration::from_secs(settings.tcp_idle_timeout_secs),
        long_poll_max: http_limits.long_poll_max,
        pending: Default::default(),
        http: metrics::router(
            Arc::clone(&metrics),
            Arc::clone(&shared),
            settings.https_metrics,
        )
        .merge(echo_routes.clone())
        .merge(Arc::clone(&credentials).routes())
        .merge(test_page.unwrap_or_default()),
    });
    let mut per_shard: Vec<(Vec<_>, Vec<_>)> =
        (0..shards).map(|_| (Vec::new(), Vec::new())).collect();
    for group in listeners {
        match group {
            io::Bound::Udp(_, socks) => {
                for (i, s) in socks.into_iter().enumerate() {
                    per_shard[i].0.push(s);
                }
            }
            io::Bound::Stream(l, socks) => {
                for (i, s) in socks.into_iter().enumerate() {
                    per_shard[i].1.push((s, l));
                }
            }
        }
    }
    let mut threads = Vec::new();
    for (i, (sockets, tcp)) in per_shard.into_iter().enumerate() {
        let setup = ShardSetup {
            index: i as u32,
            shared: Arc::clone(&shared),
            sockets,
            tcp,
            streams: Arc::clone(&streams),
            plan: plan.clone(),
            reservations: Arc::clone(&reservations),
            metrics: Arc::clone(&metrics),
        };
        let stop = stop_rx.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("turnpike-shard-{i}"))
                .spawn(move || {
                    if let Err(e) = io::run_shard(setup, stop) {
                        tracing::error!(error = %e, "shard stopped");
                    }
                })?,
        );
    }

    let grace = Duration::from_secs(settings.drain_grace_secs);
    let mut reloader = Reloader {
        cli,
        files: watched(cli, &settings),
        current: settings,
        plan: plan.clone(),
        bound: bound.clone(),
        shared: Arc::clone(&shared),
        streams: Arc::clone(&streams),
        credentials: Arc::clone(&credentials),
        metrics: Arc::clone(&metrics),
    };
    rt.block_on(async {
        if let Some(l) = metrics_listener {
            let app =
                metrics::router(Arc::clone(&metrics), Arc::clone(&shared), true).merge(echo_routes);
            tokio::spawn(metrics::serve(
                l,
                app,
                Arc::clone(&admission),
                http_limits,
                Arc::clone(&metrics),
            ));
        }
        if let Err(e) = echo_sockets.spawn(&echo) {
            tracing::error!(error = %e, "echo services not started");
        }
        let mut stop = StopSignals::new();
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut poll_files = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = stop.recv() => break,
                Some(_) = async { hangup.as_mut()?.recv().await } => reloader.reload("SIGHUP"),
                _ = poll_files.tick() => {
                    if reloader.changed() {
                        reloader.reload("file changed");
                    }
                }
            }
        }
        shared.start_draining();
        let active = shared.quotas.active();
        tracing::info!(
            active,
            grace_secs = grace.as_secs(),
            "draining: new allocations refused"
        );
        let deadline = Instant::now() + grace;
        let mut poll = tokio::time::interval(Duration::from_millis(200));
        while shared.quotas.active() > 0 && Instant::now() < deadline {
            tokio::select! {
                _ = poll.tick() => {}
                _ = stop.recv() => break,
            }
        }
        tracing::info!(active = shared.quotas.active(), "stopping");
    });
    let _ = stop_tx.send(true);
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Keeps the relay's own listening ports out of the relay port registry, for every relay
/// address a listener covers (one on the unspecified address covers all of its family).
fn reserve_own_ports(shared: &Shared, plan: &io::RelayPlan, listeners: &[io::Bound]) {
    use crate::proto::ports::RelayTransport;
    for b in listeners {
        let (Some(addr), l) = (b.local_addr(), b.listener()) else {
            continue;
        };
        let transport = match l.transport {
            crate::config::Transport::Udp => RelayTransport::Udp,
            crate::config::Transport::Tcp | crate::config::Transport::Tls => RelayTransport::Tcp,
        };
        for (bind, _) in [plan.v4, plan.v6].into_iter().flatten() {
            let covers = addr.ip() == bind
                || (addr.ip().is_unspecified() && addr.is_ipv4() == bind.is_ipv4());
            if covers {
                shared.ports.reserve(transport, bind, addr.port());
            }
        }
    }
}

/// Every allocation holds a socket, so the soft open-files limit (often 1024 under container
/// runtimes) would cap a relay at about a thousand allocations: raise it to the hard limit.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write and read a plain struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let soft = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                tracing::debug!(
                    from = soft,
                    to = lim.rlim_max,
                    "raised the open-files limit"
                );
            }
        }
    }
    tracing::info!(
        open_files = lim.rlim_cur,
        "open-files limit (one per allocation, and per TCP connection)"
    );
}

/// SIGTERM and SIGINT, listened to once for the whole run: a signal that arrives while the
/// main loop is busy elsewhere is kept for the next `recv`, not lost with a dropped listener.
struct StopSignals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    fn new() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        StopSignals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    async fn recv(&mut self) {
        let term = async {
            match self.term.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        let int = async {
            match self.int.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term => {}
            _ = int => {}
        }
    }
}

/// With no credentials configured, prints a ready-to-use one minted from the generated secret
/// (on stdout, not in the log; the secret itself is never shown).
fn print_credential(settings: &Settings, listeners: &[crate::config::Listener]) {
    use crate::config::Transport;
    let Some(secret) = settings.secrets.first() else {
        return;
    };
    let expiry = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 86_400;
    let username = ephemeral_username(expiry, Some("turnpike"));
    let password = ephemeral_password(&secret.0, &username);
    println!("No credentials configured: generated a shared secret for this run.");
    println!("Credential valid for 24 hours:");
    for l in listeners {
        let port = l.addr.port();
        match l.transport {
            Transport::Udp => println!("  url:      turn:<this host>:{port}?transport=udp"),
            Transport::Tcp => println!("  url:      turn:<this host>:{port}?transport=tcp"),
            Transport::Tls => println!("  url:      turns:<this host>:{port}?transport=tcp"),
        }
    }
    println!("  username: {username}");
    println!("  password: {password}");
    println!("  realm:    {}", settings.realm);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FileConfig;

    #[test]
    fn the_core_configuration_prints_no_secret() {
        let text = r#"
listen = ["udp://127.0.0.1:0"]
relay_ips = ["127.0.0.1"]
[auth]
secrets = ["fleet-secret-value"]
users = [{ name = "alice", password = "alice-password-value" }]
"#;
        let file = FileConfig::from_toml("test.toml", text).expect("parses");
        let settings =
            Settings::resolve(file, &Cli::default(), "test.toml".into()).expect("resolves");
        let plan = io::relay_plan(&settings);
        let printed = format!("{:?}", core_config(&settings, &plan, &[]));
        assert!(printed.contains("Credentials"), "{printed}");
        for secret in ["fleet-secret-value", "alice-password-value"] {
            assert!(!printed.contains(secret), "{secret} printed:\n{printed}");
        }
    }
}

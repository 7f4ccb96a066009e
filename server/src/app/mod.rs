//! Start-up and shutdown: settings to sockets, shards and the metrics endpoint; SIGTERM
//! drains.
//!
//! - `core_config`: the settings as the core takes them.
//! - `reload`: SIGHUP and file changes.
//! - `signals`: SIGTERM and SIGINT.

mod core_config;
mod holder;
mod reload;
mod signals;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use turnpike_proto::auth::{ephemeral_password, ephemeral_username};
use turnpike_proto::quota::QuotaState;
use turnpike_proto::Shared;

use crate::config::{Cli, LogFormat, Settings};
use crate::echo::{self, Echo};
use crate::io::{self, ShardSetup};
use crate::metrics::{self, Metrics};
use crate::service::CredentialService;
use crate::testpage::TestPage;
use crate::Error;
use core_config::core_config;
use reload::{watched, Reloader};
use signals::StopSignals;

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

/// What `--check-config` must prove besides the file itself: the certificates load, and
/// every listener, the metrics endpoint and the echo ports can be bound now (they are let go
/// at once). An address this machine does not have is a warning, not an error: the file may
/// be meant for another machine (a pod's IP, say). Returns those warnings.
pub fn check(settings: &Settings) -> Result<Vec<String>, Error> {
    tls_of(settings)?;
    let mut warnings = Vec::new();
    for (i, l) in settings.listen.iter().enumerate() {
        if let Err((_, e)) = io::bind_listeners(std::slice::from_ref(l), 1, 0) {
            let (file, key) = settings.listener_key(i);
            elsewhere(e, (&file, &key), &mut warnings)?;
        }
    }
    if let Some(addr) = settings.metrics_listen {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        if let Err(e) = rt.block_on(metrics::bind(addr)) {
            let origin = (
                settings.metrics_origin.0.as_str(),
                settings.metrics_origin.1,
            );
            elsewhere(e, origin, &mut warnings)?;
        }
    }
    if let Err(e) = echo::bind(&settings.echo) {
        elsewhere(e, (&settings.source, "echo"), &mut warnings)?;
    }
    Ok(warnings)
}

/// A bind error, as a warning when the address is not one of this machine's, else placed at
/// its key.
fn elsewhere(e: Error, at: (&str, &str), warnings: &mut Vec<String>) -> Result<(), Error> {
    if let Error::Bind { what, addr, source } = &e {
        if source.kind() == std::io::ErrorKind::AddrNotAvailable {
            warnings.push(format!(
                "{}: key `{}`: {addr} is not an address of this machine: the relay starts with this configuration only where it is",
                at.0, at.1
            ));
            return Ok(());
        }
        // The running relay the edited file is for, usually: checking beside it is the point.
        if source.kind() == std::io::ErrorKind::AddrInUse {
            let who = holder::holder(*addr, what.contains("udp"))
                .unwrap_or_else(|| "another process".to_owned());
            warnings.push(format!(
                "{}: key `{}`: {what} {addr} is in use by {who}: the relay starts with this configuration once it is free",
                at.0, at.1
            ));
            return Ok(());
        }
    }
    Err(e.at(at))
}

/// Binds the listeners, `shards` sockets each; an error names the listener's key.
fn bind_listeners(settings: &Settings, shards: usize) -> Result<Vec<io::Bound>, Error> {
    io::bind_listeners(&settings.listen, shards, settings.socket_buffer_bytes).map_err(|(i, e)| {
        let (file, key) = settings.listener_key(i);
        e.at((&file, &key))
    })
}

pub(crate) fn tls_of(settings: &Settings) -> Result<Option<Arc<rustls::ServerConfig>>, Error> {
    match (&settings.tls_cert, &settings.tls_key) {
        (Some(c), Some(k)) => Ok(Some(io::stream::tls_config(c, k)?)),
        _ => Ok(None),
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
    let listeners = bind_listeners(&settings, shards)?;
    let bound: Vec<_> = listeners.iter().filter_map(io::Bound::local_addr).collect();

    let config = core_config(&settings, &plan, &bound);
    let nonce_key = nonce_key(&settings);
    let shared = Arc::new(Shared::new(
        config,
        QuotaState::new(settings.quotas.total_allocations),
        nonce_key,
        Instant::now(),
    ));
    reserve_own_ports(&shared, &plan, &listeners);
    let shared_ports = io::bind_shared_ports(
        &shared,
        &plan,
        shards,
        settings.shared_relay_ports,
        settings.socket_buffer_bytes,
    )
    .map_err(|reason| Error::Config {
        file: settings.source.clone(),
        key: "shared_relay_ports".into(),
        reason,
    })?;
    let metrics = Arc::new(Metrics::new());
    metrics.set_capacity(
        settings.quotas.total_allocations,
        (settings.shared_relay_ports == 0).then_some(plan.ports),
    );
    metrics.add_tenants(&shared.tenant_names());

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let metrics_origin = (
        settings.metrics_origin.0.as_str(),
        settings.metrics_origin.1,
    );
    let metrics_listener = match settings.metrics_listen {
        Some(addr) => Some(
            rt.block_on(metrics::bind(addr))
                .map_err(|e| e.at(metrics_origin))?,
        ),
        None => None,
    };
    let admin_listener = match settings.fleet.admin_listen {
        crate::config::fleet::AdminListen::Own(addr) => Some(
            rt.block_on(tokio::net::TcpListener::bind(addr))
                .map_err(|e| crate::Error::Config {
                    file: settings.source.clone(),
                    key: "admin.listen".into(),
                    reason: format!("cannot listen on {addr}: {e}"),
                })?,
        ),
        crate::config::fleet::AdminListen::Metrics => None,
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
    if settings.shared_relay_ports > 0 {
        let ports: Vec<String> = shared_ports
            .iter()
            .flatten()
            .map(|s| s.advertised.to_string())
            .collect();
        tracing::info!(
            ports = %ports.join(" "),
            "shared relay ports: UDP allocations relay through these (open them in the firewall)"
        );
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
        print_credential(&settings, &bound_listeners, &plan);
    }
    let credentials = Arc::new(CredentialService::new(&settings, &bound_listeners));
    // The tenant store (SQLite is opened and migrated now, so a bad path fails the start;
    // PostgreSQL is connected in the background, and retried while it is down).
    let store = match &settings.fleet.store_url {
        Some(url) => {
            let s = crate::store::Store::open(&url.0).map_err(|e| crate::Error::Config {
                file: settings.source.clone(),
                key: "store.url".into(),
                reason: e.to_string(),
            })?;
            tracing::info!(store = %s.shown, kind = s.kind(), "tenant store");
            Some(s)
        }
        None => None,
    };
    let local =
        match &settings.fleet.state_dir {
            Some(dir) => Some(crate::store::local::Local::open(dir).map_err(|reason| {
                crate::Error::Config {
                    file: settings.source.clone(),
                    key: "store.state_dir".into(),
                    reason: format!(
                        "{reason} (the store's snapshot and unwritten usage are kept there)"
                    ),
                }
            })?),
            None => None,
        };
    let fleet = crate::fleet::Fleet::new(&settings.fleet, store, local.clone());
    fleet.board.set_shards(shards);
    // No redirect may send a client back to one of this relay's own listeners.
    let mut own = turnpike_proto::core::Alternate::default();
    for l in &bound_listeners {
        match l.transport {
            crate::config::Transport::Udp => own.udp.push(l.addr),
            crate::config::Transport::Tcp => own.tcp.push(l.addr),
            crate::config::Transport::Tls => own.tls.push(l.addr),
        }
    }
    fleet.set_own_addresses(own);
    // The redirect limit holds from the first Allocate (the fleet loop keeps it current).
    shared
        .quotas
        .set_redirect_at(u32::try_from(settings.fleet.max_allocations).unwrap_or(u32::MAX));
    fleet
        .merge
        .store(Arc::new(crate::config::fleet::StoreMerge::of(&settings)));
    if fleet.store.is_some() {
        metrics.set_store(Arc::clone(&fleet.status));
    }
    let admin = crate::admin::Admin::new(Arc::clone(&fleet), &settings.fleet);
    if !settings.fleet.admin_keys.is_empty() {
        use crate::config::fleet::AdminListen;
        // Where it answers, as bound (port 0 resolved).
        let bound = |l: &Option<tokio::net::TcpListener>| l.as_ref()?.local_addr().ok();
        let on = match settings.fleet.admin_listen {
            AdminListen::Own(_) => bound(&admin_listener),
            AdminListen::Metrics => bound(&metrics_listener),
        };
        match on {
            Some(a) => {
                tracing::info!(%a, https_listeners = settings.fleet.admin_https_listeners, "admin API on http://{a}/v1/admin/");
                if !a.ip().is_loopback() {
                    tracing::warn!(%a, "the admin API answers plain HTTP on a non-loopback address: its keys cross the network in the clear; keep it on loopback or a private network, or use [admin] https_listeners");
                }
            }
            None if settings.fleet.admin_https_listeners => {
                tracing::info!("admin API over HTTPS on the TLS listeners only");
            }
            None => tracing::warn!(
                "[admin] keys are set but the admin API answers nowhere: no metrics listener, no [admin] listen, no https_listeners"
            ),
        }
    }
    let tls_refusals = Arc::new(crate::tls_seen::TlsRefusals::default());
    let test_page = settings.test_page.clone().map(|t| {
        Arc::new(TestPage::new(
            t,
            Arc::clone(&credentials),
            plan.ports,
            settings.echo.websocket,
            settings.echo.long_poll_max_secs > 0,
            Arc::clone(&tls_refusals),
        ))
        .routes()
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let admission = crate::admission::Admission::new(
        settings.max_connections_per_ip,
        settings.max_unallocated_connections,
    );
    let http_limits = crate::http::HttpLimits {
        headers: Duration::from_secs(settings.tcp_handshake_timeout_secs),
        long: (settings.echo.long_poll_max_secs > 0).then(|| {
            (
                echo::LONG_POLL_PATH,
                Duration::from_secs(settings.echo.long_poll_max_secs),
            )
        }),
        lifetime: Duration::from_secs(settings.tcp_unallocated_lifetime_secs),
    };
    let streams = Arc::new(io::stream::StreamContext {
        tls: arc_swap::ArcSwapOption::new(tls),
        upstream: settings.https_upstream,
        web_hostnames: settings.web_hostnames.clone(),
        admission: Arc::clone(&admission),
        handshake_timeout: http_limits.headers,
        idle_timeout: Duration::from_secs(settings.tcp_idle_timeout_secs),
        unallocated_lifetime: http_limits.lifetime,
        long_poll: http_limits.long,
        pending: Default::default(),
        tls_refusals,
        http: metrics::router(
            Arc::clone(&metrics),
            Arc::clone(&shared),
            settings.https_metrics,
        )
        .merge(echo_routes.clone())
        .merge(Arc::clone(&credentials).routes())
        .merge(if settings.fleet.admin_https_listeners {
            Arc::clone(&admin).routes(false)
        } else {
            axum::Router::new()
        })
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
    let mut shared_ports = shared_ports.into_iter();
    for (i, (sockets, tcp)) in per_shard.into_iter().enumerate() {
        let setup = ShardSetup {
            index: i as u32,
            shared: Arc::clone(&shared),
            sockets,
            tcp,
            streams: Arc::clone(&streams),
            metrics: Arc::clone(&metrics),
            shared_ports: shared_ports.next().unwrap_or_default(),
            fleet: Arc::clone(&fleet),
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
        fleet: Arc::clone(&fleet),
        admin: Arc::clone(&admin),
        snapshot: None,
    };
    rt.block_on(async {
        let admin_on_metrics =
            reloader.current.fleet.admin_listen == crate::config::fleet::AdminListen::Metrics;
        if let Some(l) = admin_listener {
            let refusals = Arc::clone(&metrics);
            tokio::spawn(crate::http::serve(
                l,
                Arc::clone(&admin).routes(true),
                Arc::clone(&admission),
                http_limits,
                move |why| refusals.connection_refused(why),
            ));
        }
        if let Some(l) = metrics_listener {
            let app = metrics::router(Arc::clone(&metrics), Arc::clone(&shared), true)
                .merge(echo_routes)
                .merge(if admin_on_metrics {
                    Arc::clone(&admin).routes(true)
                } else {
                    axum::Router::new()
                });
            let refusals = Arc::clone(&metrics);
            tokio::spawn(crate::http::serve(
                l,
                app,
                Arc::clone(&admission),
                http_limits,
                move |why| refusals.connection_refused(why),
            ));
        }
        if let Err(e) = echo_sockets.spawn(&echo) {
            tracing::error!(error = %e, "echo services not started");
        }
        let mut stop = StopSignals::new();
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut poll_files = tokio::time::interval(Duration::from_millis(250));
        let (store_tx, mut store_rx) = tokio::sync::mpsc::channel(4);
        if let Some(store) = &fleet.store {
            tokio::spawn(crate::store::watch(
                Arc::clone(store),
                Arc::clone(&fleet.status),
                store_tx,
                Duration::from_secs(30),
                local.clone(),
            ));
        }
        tokio::spawn(fleet_loop(Arc::clone(&fleet), Arc::clone(&shared)));
        loop {
            tokio::select! {
                _ = stop.recv() => break,
                Some(snapshot) = store_rx.recv() => {
                    reloader.snapshot = Some(snapshot);
                    reloader.reload("store changed");
                }
                Some(_) = async { hangup.as_mut()?.recv().await } => reloader.reload("SIGHUP"),
                _ = poll_files.tick() => {
                    if reloader.changed() {
                        reloader.reload("file changed");
                    }
                }
            }
        }
        shared.start_draining();
        // New allocations go to a sibling from now on, where one is known.
        fleet.update_redirect(&shared).await;
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
    // The last sessions' usage (the allocations the stop ended).
    rt.block_on(fleet.flush_usage());
    Ok(())
}

/// The key the relay's stateless nonces are made with. Every relay of a fleet needs the same
/// one, so that a client redirected to a sibling (300 Try Alternate) keeps its nonce there
/// (libwebrtc does not take a 438 on Allocate): `auth.nonce_secret`, else one derived from
/// the first shared secret (the fleet shares it), else a random one for this run.
fn nonce_key(settings: &crate::config::Settings) -> [u8; 32] {
    use hmac::Mac;
    let seed = settings.nonce_secret.clone().or_else(|| {
        settings
            .tenants
            .iter()
            .find(|t| t.name == turnpike_proto::tenant::DEFAULT_TENANT)
            .or(settings.tenants.first())
            .and_then(|t| t.secrets.first().cloned())
    });
    let Some(seed) = seed else {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        return key;
    };
    let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(seed.0.as_bytes()) else {
        return [0u8; 32];
    };
    mac.update(b"turnpike nonce key v1");
    mac.finalize().into_bytes().into()
}

/// Fleet chores off the packet path: the redirect (twice a second), this relay's published
/// load (every two seconds), and the hourly usage written to the store (every second).
async fn fleet_loop(fleet: Arc<crate::fleet::Fleet>, shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        n += 1;
        fleet.update_redirect(&shared).await;
        if n % 2 == 0 {
            fleet.flush_usage().await;
        }
        if n % 4 == 1 {
            fleet.publish(&shared).await;
        }
    }
}

/// Keeps the relay's own listening ports out of the relay port registry, for every relay
/// address a listener covers (one on the unspecified address covers all of its family).
fn reserve_own_ports(shared: &Shared, plan: &io::RelayPlan, listeners: &[io::Bound]) {
    use turnpike_proto::ports::RelayTransport;
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

/// With no credentials configured, prints a ready-to-use one minted from the generated secret
/// (on stdout, not in the log; the secret itself is never shown). The URLs name the
/// listener's address, or for one on every interface the address the relay advertises.
fn print_credential(
    settings: &Settings,
    listeners: &[crate::config::Listener],
    plan: &io::RelayPlan,
) {
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
        let ip = l.addr.ip();
        let host = if ip.is_unspecified() {
            let family = if ip.is_ipv4() { plan.v4 } else { plan.v6 };
            family.map_or(ip, |(_, advertised)| advertised)
        } else {
            ip
        };
        let at = std::net::SocketAddr::new(host, l.addr.port());
        match l.transport {
            Transport::Udp => println!("  url:      turn:{at}?transport=udp"),
            Transport::Tcp => println!("  url:      turn:{at}?transport=tcp"),
            Transport::Tls => println!("  url:      turns:{at}?transport=tcp"),
        }
    }
    println!("  username: {username}");
    println!("  password: {password}");
    println!("  realm:    {}", settings.realm);
}
